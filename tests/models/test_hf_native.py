"""COMMForCausalLM as a transformers model: the Hugging Face layout (sharded safetensors with an index), the
Auto classes after ``import comm_fast``, directories of the earlier layout, dtype on load."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from comm_fast import COMMConfig, COMMForCausalLM
from comm_fast.data import ByteTokenizer


def tiny(tied: bool) -> COMMForCausalLM:
    config = COMMConfig.preset("tiny")
    config.text["tie_word_embeddings"] = tied
    model = COMMForCausalLM(config, ByteTokenizer()).eval()
    with torch.no_grad():  # random merge heads (LayerNorm identity and alpha = 1/L would hide a head not loaded)
        for name in model.vision.HEADS:
            for p in getattr(model.vision, name).parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_earlier_layout(model, directory) -> None:
    """A directory as COMMForCausalLM.save_pretrained wrote it before model_type "comm": config.json with
    config_type comm_causal_lm, one model.safetensors (no lm_head when tied), the tokenizer."""
    from safetensors.torch import save_file

    os.makedirs(directory)
    c = model.config
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"config_type": "comm_causal_lm", "vision": c.vision.to_dict(), "text": dict(c.text),
                   "image_token_id": c.image_token_id, "max_length": c.max_length}, f, indent=2)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if c.text.get("tie_word_embeddings"):
        sd.pop("llm.lm_head.weight")
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    model.tokenizer.save(directory)


def inputs(model):
    tok = model.tokenizer
    text = tok.encode(" what is it? ASSISTANT:")
    ids = torch.tensor([[tok.bos_id, *tok.encode("USER: "), tok.image_token_id, *text]])
    return dict(input_ids=ids, pixel_values=(torch.randn(1, 3, 56, 56), torch.randn(1, 3, 56, 56)))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def assert_tied(model, tied):
    same = model.llm.lm_head.weight.data_ptr() == model.llm.model.embed_tokens.weight.data_ptr()
    assert same == tied


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_auto_classes_load_the_hugging_face_layout(tmp_path, seed, tied):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny(tied)
    assert_tied(model, tied)
    model.save_pretrained(tmp_path / "m", max_shard_size="300KB")
    files = set(os.listdir(tmp_path / "m"))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"} <= files
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 2 and set(shards) <= files and "model.safetensors" not in files
    assert ("llm.lm_head.weight" in index) != tied  # a tied head is the embedding, written once
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "comm" and config["architectures"] == ["COMMForCausalLM"]

    assert type(AutoConfig.from_pretrained(tmp_path / "m")) is COMMConfig
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ours = COMMForCausalLM.from_pretrained(tmp_path / "m")
    assert type(auto) is COMMForCausalLM and auto.tokenizer.layout == "bytes"
    assert auto.config.to_dict()["vision"] == model.config.to_dict()["vision"]
    assert auto.config.text == model.config.text
    assert_tied(auto, tied)
    batch = inputs(model)
    expected = logits(model, batch)
    torch.testing.assert_close(logits(auto, batch), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(ours, batch), expected, rtol=0, atol=0)
    assert all(not p.requires_grad for p in (*auto.vision.clip.parameters(), *auto.vision.dino.parameters()))
    assert auto.vision.projector.weight.requires_grad and auto.llm.lm_head.weight.requires_grad


def test_dtype_on_load(tmp_path, seed):
    from transformers import AutoModelForCausalLM

    model = tiny(False)
    model.save_pretrained(tmp_path / "m")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    ours = COMMForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in auto.parameters()} == {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert COMMForCausalLM.from_pretrained(tmp_path / "m").dtype == torch.float32  # as built, whatever was saved
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in COMMForCausalLM.from_pretrained(tmp_path / "bf16").parameters()} == {torch.float32}
    older = COMMForCausalLM.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)  # transformers' older name
    assert {p.dtype for p in older.parameters()} == {torch.bfloat16}
    rotary = copy.deepcopy(model.llm.model.rotary_emb)  # RoPE's inverse frequencies stay float32, as built
    reference = model.to(torch.bfloat16)
    reference.llm.model.rotary_emb = rotary
    batch = inputs(model)
    expected = logits(reference, batch)
    torch.testing.assert_close(logits(auto, batch), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(ours, batch), expected, rtol=0, atol=0)
    write_earlier_layout(model.float(), tmp_path / "old")
    torch.testing.assert_close(logits(COMMForCausalLM.from_pretrained(tmp_path / "old", dtype=torch.bfloat16), batch),
                               expected, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_directories_of_the_earlier_layout_still_load(tmp_path, seed, tied):
    model = tiny(tied)
    write_earlier_layout(model, tmp_path / "old")
    again = COMMForCausalLM.from_pretrained(tmp_path / "old")
    assert_tied(again, tied)
    batch = inputs(model)
    torch.testing.assert_close(logits(again, batch), logits(model, batch), rtol=0, atol=0)
    again.save_pretrained(tmp_path / "new")  # and they are written in the Hugging Face layout
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["model_type"] == "comm" and "config_type" not in config
    torch.testing.assert_close(logits(COMMForCausalLM.from_pretrained(tmp_path / "new"), batch), logits(model, batch),
                               rtol=0, atol=0)


def test_weights_that_do_not_fit_are_an_error(tmp_path, seed):
    model = tiny(False)
    model.save_pretrained(tmp_path / "m", max_shard_size="300KB")
    path = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    dropped = sorted(set(index["weight_map"].values()))[1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != dropped}
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"checkpoint does not fit COMMForCausalLM: missing keys \["):
        COMMForCausalLM.from_pretrained(tmp_path / "m")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a saved COMMForCausalLM .*model_type 'llama'"):
        COMMForCausalLM.from_pretrained(tmp_path / "llama")


def _edit_weights(directory, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    weights = load_file(path)
    edit(weights)
    save_file(weights, path, metadata={"format": "pt"})


def test_unexpected_and_misshapen_weights_are_errors_too(tmp_path, seed):
    """Stricter than transformers, which warns of unexpected keys and, with ignore_mismatched_sizes=True,
    re-initialises a misshapen weight: both are errors naming the key. A missing directory is named."""
    tiny(False).save_pretrained(tmp_path / "m")
    _edit_weights(tmp_path / "m", lambda w: w.__setitem__("vision.extra.weight", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"does not fit COMMForCausalLM: unexpected keys \['vision.extra.weight'\]"):
        COMMForCausalLM.from_pretrained(tmp_path / "m")
    tiny(False).save_pretrained(tmp_path / "m2")
    _edit_weights(tmp_path / "m2", lambda w: w.__setitem__("vision.projector.weight", torch.zeros(128, 129)))
    with pytest.raises(ValueError, match="does not fit COMMForCausalLM: mismatched keys .*vision.projector.weight"):
        COMMForCausalLM.from_pretrained(tmp_path / "m2", ignore_mismatched_sizes=True)
    with pytest.raises(FileNotFoundError, match="model: no such directory"):
        COMMForCausalLM.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_writes_the_state_dict_it_is_given_and_reports_loading(tmp_path, seed, tied):
    """As transformers has them: save_pretrained(state_dict=sd) writes sd (FSDP's gathered weights), not the
    model's own; from_pretrained(output_loading_info=True) returns (model, info)."""
    model, other = tiny(tied), tiny(tied)
    model.save_pretrained(tmp_path / "m", state_dict=other.state_dict())
    again, info = COMMForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got, want = again.state_dict(), other.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_config_is_a_pretrained_config():
    from transformers import PretrainedConfig

    config = COMMConfig.preset("tiny")
    assert isinstance(config, PretrainedConfig) and config.model_type == "comm"
    again = COMMConfig(config.vision, config.text, config.image_token_id, config.max_length)  # positional
    assert again.to_dict() == config.to_dict() == COMMConfig.from_dict(config.to_dict()).to_dict()
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()  # a resumed run compares the two
    with pytest.raises(ValueError, match="vision.out_dim: 128 must equal the LLM's hidden_size 64"):
        COMMConfig(config.vision, {**config.text, "hidden_size": 64}, config.image_token_id)
    with pytest.raises(ValueError, match="expected model_type 'comm'"):
        COMMConfig.from_dict({**config.to_dict(), "model_type": "llama"})


def test_a_fresh_process_registers_on_import(tmp_path, seed):
    """``import comm_fast`` imports no transformers; its Auto classes know model_type "comm" once imported,
    and the other way round (transformers first)."""
    tiny(False).save_pretrained(tmp_path / "m")
    script = ("import sys, comm_fast; assert 'transformers' not in sys.modules; "
              "from transformers import AutoModelForCausalLM as A; "
              f"print(type(A.from_pretrained({str(tmp_path / 'm')!r})).__name__)")
    later = ("from transformers import AutoModelForCausalLM as A, AutoConfig; import comm_fast; "
             f"print(type(A.from_pretrained({str(tmp_path / 'm')!r})).__name__)")
    for code in (script, later):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.split()[-1] == "COMMForCausalLM", out.stderr[-2000:]


def test_construction_draws_the_random_init_of_its_parts(seed):
    """transformers' post_init redraws nothing: the tower is as COMMVisionTower builds it (LayerNorms identity,
    alpha = 1/L, Linear defaults) and the LLM as LlamaForCausalLM builds it, from the same random stream."""
    from transformers import LlamaForCausalLM

    from comm_fast.models.packing import attention_implementation
    from comm_fast.tower import COMMVisionTower

    config = COMMConfig.preset("tiny")
    torch.manual_seed(seed)
    model = COMMForCausalLM(config)
    torch.manual_seed(seed)
    tower = COMMVisionTower(config.vision)
    llm = LlamaForCausalLM._from_config(config.llama_config(), attn_implementation=attention_implementation())
    expected = {**{f"vision.{k}": v for k, v in tower.state_dict().items()},
                **{f"llm.{k}": v for k, v in llm.state_dict().items()}}
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
