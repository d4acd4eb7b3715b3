"""transformers.Trainer on the tiny preset with COMMDataCollator: on the same batch its loss is comm-fast
train's (TrainStep: the sum over label tokens / the batch's label count), padded or packed; it trains the
parameters comm-fast train trains (encoders frozen); a few steps move the weights."""
import copy

import numpy as np
import pytest
import torch

from comm_fast.data.collator import COMMDataCollator
from comm_fast.data.dataset import ConversationDataset, resolve_data
from comm_fast.data.synthetic import make_synthetic
from comm_fast.mllm import COMMForCausalLM
from comm_fast.presets import get
from comm_fast.training.train import TrainStep, configure_stage

BATCH = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("trainer") / "data", 8, seed=3)


@pytest.fixture
def model(seed):
    preset = get("tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(preset.cpu_threads or threads)  # as comm-fast train runs the tiny preset
    yield COMMForCausalLM(preset.config(), preset.tokenizer())
    torch.set_num_threads(threads)


@pytest.fixture
def dataset(data_dir, model):
    json_path, folder = resolve_data(data_dir, "finetune")
    return ConversationDataset(json_path, folder, model.tokenizer, model.num_image_tokens, model.config.max_length)


def make_trainer(model, dataset, collator, out, steps=1, **kw):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH,
                             learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
                             logging_steps=1, **kw)
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)


def train_step_loss(model, dataset, idx, pack):
    """comm-fast train's loss on these samples (its TrainStep, with an update of size 0)."""
    ref = copy.deepcopy(model)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    step = TrainStep(ref, ref, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), dataset, "cpu",
                     pack=pack, pack_length=None, max_grad_norm=1.0, micro_batch=len(idx))
    return step(idx)["loss"]


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_trainer_loss_is_comm_fast_train_loss_on_the_same_batch(model, dataset, tmp_path, pack):
    collator = COMMDataCollator.for_model(model, pack=pack)
    idx = [0, 3, 5, 6]  # text-only and image samples of different lengths
    batch = collator([dataset[i] for i in idx])
    assert ("position_ids" in batch) == pack and ("attention_mask" in batch) != pack
    assert batch["pixel_values"][0].shape[0] == sum(len(dataset[i].images) for i in idx) > 0
    trainer = make_trainer(model, dataset, collator, tmp_path)
    loss = trainer.compute_loss(trainer.model, batch).item()  # what Trainer differentiates
    want = train_step_loss(model, dataset, idx, pack)
    assert abs(loss - want) <= 1e-6 * want, (loss, want)


def test_trainer_trains_what_comm_fast_train_trains_and_moves_the_weights(model, dataset, tmp_path):
    expected = configure_stage(copy.deepcopy(model), "finetune", None)  # comm-fast train's finetune stage
    assert any(n.startswith("vision.clip.") for n, _ in model.named_parameters())
    assert not any(n.startswith(("vision.clip.", "vision.dino.")) for n in expected)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(model, dataset, COMMDataCollator.for_model(model, pack=True), tmp_path, steps=2)
    result = trainer.train()
    assert trainer.state.global_step == 2 and np.isfinite(result.training_loss)
    names = {id(p): n for n, p in model.named_parameters()}
    optimized = {names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == expected
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == expected  # every trained tensor moved (AdamW's first step moves each), nothing else


def test_the_collator_takes_mappings_and_raw_images_and_refuses_bad_input(model, dataset):
    s = dataset[0] if dataset[0].images else next(x for x in dataset.samples if x.images)
    as_dict = {"input_ids": s.input_ids.tolist(), "labels": s.labels.tolist(), "images": s.images[0]}
    a = COMMDataCollator.for_model(model)([s])
    b = COMMDataCollator.for_model(model, preprocess=False, return_logits=True)([as_dict])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert len(b["images"]) == 1 and b["images"][0].dtype == np.uint8 and b["return_logits"]
    assert "pixel_values" not in b and a["return_logits"] is False
    with torch.no_grad():  # the model preprocesses the raw images itself: the same loss
        la = model(**a).loss
        lb = model(**b).loss
    torch.testing.assert_close(la, lb)
    with pytest.raises(TypeError, match=r"features\[0\]: expected a Sample or a mapping .* got list"):
        COMMDataCollator.for_model(model)([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"features\[0\]: input_ids and labels must be 1-D of one length"):
        COMMDataCollator.for_model(model)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(TypeError, match="pad_id: expected the tokenizer's padding id"):
        COMMDataCollator("0", model.config.vision)


def test_trainer_accumulation_gives_the_global_token_mean(model, dataset, tmp_path):
    """Two accumulated micro-batches of 2: Trainer passes their joint label count (num_items_in_batch) and the
    summed gradient is the one of the 4-sample batch's token mean, not a mean of the two micro-batch means."""
    collator = COMMDataCollator.for_model(model)
    idx = [0, 3, 5, 6]
    micro = [collator([dataset[i] for i in idx[:2]]), collator([dataset[i] for i in idx[2:]])]
    total = sum(int((b["labels"][..., 1:] != -100).sum()) for b in micro)  # how Trainer counts them
    ref = copy.deepcopy(model)
    out = ref(**collator([dataset[i] for i in idx]))
    assert out.num_label_tokens == total
    out.loss.backward()
    trainer = make_trainer(model, dataset, collator, tmp_path, gradient_accumulation_steps=2)
    counts = [int((b["labels"][..., 1:] != -100).sum()) for b in micro]
    assert counts[0] != counts[1]  # else a mean of means would pass too
    model.zero_grad()
    for b in micro:
        trainer.training_step(trainer.model, b, torch.tensor(total))
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
