"""ByteTokenizer saved in Hugging Face's format: AutoTokenizer gives the same ids and text, both layouts."""
import json
import random

import pytest

from comm_fast.data.tokenizer import ByteTokenizer, bytes_to_unicode, load_tokenizer


def random_text(rng: random.Random, n: int) -> str:
    """ASCII, whitespace runs, Latin-1, CJK, emoji and special-token look-alikes, shuffled."""
    pieces = ["a", "Z", "7", " ", "  ", "\n", "\t", "é", "ÿ", "\x7f", "\x00", "—", "日本", "🎉", "<s>", "</s>",
              "<image>", "<pad>", "<unk>", "[0.12, 0.5]", "Ġ", "Ā"]
    return "".join(rng.choice(pieces) for _ in range(n))


def test_the_byte_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode as reference

    assert bytes_to_unicode() == reference()


@pytest.mark.parametrize("layout", ["bytes", "llama"])
def test_auto_tokenizer_reads_the_saved_files_with_the_same_ids(tmp_path, layout, seed):
    from transformers import AutoTokenizer

    ours = ByteTokenizer(layout, system="Answer briefly.")
    ours.save(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert hf.convert_tokens_to_ids("<image>") == ours.image_token_id
    # LLaMA's pad is its <unk> (id 0), as LLaVA pads; the bytes layout has a <pad> of its own
    assert hf.pad_token == hf.convert_ids_to_tokens(ours.pad_id) == {"bytes": "<pad>", "llama": "<unk>"}[layout]
    from comm_fast.data.tokenizer import HFTokenizer

    wrapped = HFTokenizer(hf, ours.image_token_id)  # as a real checkpoint's tokenizer is used
    assert (wrapped.pad_id, wrapped.bos_id, wrapped.eos_id) == (ours.pad_id, ours.bos_id, ours.eos_id)
    rng = random.Random(seed)
    for text in [*ours.special_tokens(), "<pad>", "<unk>", *(random_text(rng, n) for n in (0, 1, 5, 40, 300))]:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text  # special-token text stays bytes
        assert hf.decode(ids) == ours.decode(ids) == text
    specials = [ours.bos_id, *ours.encode("hi"), ours.eos_id, ours.pad_id]
    assert hf.decode(specials, skip_special_tokens=True) == ours.decode(specials) == "hi"
    again = load_tokenizer(tmp_path)  # comm_fast reads its own fields back
    assert (type(again), again.layout, again.system) == (ByteTokenizer, layout, "Answer briefly.")
    hf.save_pretrained(tmp_path / "resaved")  # a transformers round trip keeps them
    assert load_tokenizer(tmp_path / "resaved").layout == layout


def test_the_earlier_layout_still_loads(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"comm_fast_tokenizer": "bytes", "layout": "llama",
                                                         "vocab_size": 32000, "system": ""}))
    tok = load_tokenizer(tmp_path)
    assert (type(tok), tok.layout, tok.system, tok.image_token_id) == (ByteTokenizer, "llama", "", 32000)


def test_a_corrupt_tokenizer_config_is_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: corrupt tokenizer file"):
        load_tokenizer(tmp_path)
