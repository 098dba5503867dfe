"""The paper's batch on few GPUs: accumulated micro-batches give one big batch's gradients, activation
checkpointing changes nothing but memory, FSDP's per-layer units and mixed precision, configs/flava_full.toml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pmd_pipeline.errors import PmdError
from pmd_pipeline.train.config import ModelConfig, TrainConfig, accumulation, load_train_config
from pmd_pipeline.train.data import TaskStream
from pmd_pipeline.train.distributed import fsdp_options
from pmd_pipeline.train.model import FlavaTasks, build_model, tiny_config
from pmd_pipeline.train.tokenizer import train_wordpiece
from pmd_pipeline.train.trainer import accumulate_gradients
from tests.train_fixtures import COLOURS, WORDS, make_pmd

FULL = Path(__file__).resolve().parents[1] / "configs" / "flava_full.toml"
BATCH = 8


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """One real batch of 8 per task, from fixture shards through the trainer's own loader."""
    root = tmp_path_factory.mktemp("scale")
    shards = make_pmd(root / "pmd", per_shard=16, shards=1)
    tokenizer = train_wordpiece([f"a {c} " + " ".join(WORDS) for c in COLOURS] * 10, 120)
    tokenizer.save_pretrained(str(root / "tok"))
    tars = {"pairs": [str(p) for p in sorted((shards / "cc3m").glob("*.tar"))],
            "image": [str(p) for p in sorted((shards / "imagenet").glob("*.tar"))],
            "text": [str(p) for p in sorted((shards / "text_corpus").glob("*.tar"))]}  # fmt: skip
    out = {}
    for task, files in tars.items():
        # a rate of 0.5 (not the paper's 0.1): the batch of 8 must hold negatives for the MMM weighting
        stream = TaskStream(task, files, str(root / "tok"), BATCH, 32, seed=3, rank=0, world=1, itm_negative_rate=0.5)
        batch = next(iter(stream))
        batch.pop("failures")
        out[task] = batch
    return out, len(tokenizer)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(vocab: int, task: str, micro: list[dict], checkpointing: bool = False):
    torch.manual_seed(0)
    model = build_model(ModelConfig(activation_checkpointing=checkpointing), vocab, 32)
    tasks = FlavaTasks(model)
    losses = accumulate_gradients(tasks, task, micro, TrainConfig(), torch.device("cpu"))
    return {k: v.item() for k, v in losses.items()}, _grads(model), model


def assert_grads_equal(grads: dict, expected: dict, what: str, tolerance: float = 1e-5) -> None:
    """Equal up to float32 summation order: each tensor within `tolerance` of its own largest entry (an
    element near zero next to entries of ~100 differs by ~1e-5 when the sums run in another order)."""
    assert grads.keys() == expected.keys(), what
    for name, grad in expected.items():
        error = (grads[name] - grad).abs().max().item()
        assert error <= tolerance * grad.abs().max().item() + 1e-8, (what, name, error)


def _split(batch: dict, parts: int) -> list[dict]:
    size = BATCH // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


@pytest.mark.parametrize("task", ["pairs", "image", "text"])
def test_accumulated_micro_batches_give_the_big_batch_gradients(batches, task):
    """Every loss, the global contrastive one included (features cached as open_clip's --accum-freq does):
    4 micro-batches give the losses and gradients of the batch of 8 they make up."""
    by_task, vocab = batches
    batch = by_task[task]
    if task == "pairs":  # ITM negatives present, so the matched-pairs-only weighting of MMM is exercised
        assert set(batch["itm_labels"].tolist()) == {0, 1}
    big_losses, big_grads, _ = _run(vocab, task, [batch])
    losses, grads, _ = _run(vocab, task, _split(batch, 4))
    assert losses == pytest.approx(big_losses, rel=1e-5, abs=1e-6)
    assert_grads_equal(grads, big_grads, f"{task}, 4 micro-batches")


def test_unweighted_micro_batch_means_would_not_be_the_big_batch(batches):
    """The weighting matters here: the plain mean of micro-batch MLM means differs from the big batch's mean
    (micro-batches mask different numbers of tokens), which the test above would have caught."""
    by_task, vocab = batches
    micro = _split(by_task["text"], 2)
    counts = [int((b["mlm_labels"] != -100).sum()) for b in micro]
    assert counts[0] != counts[1]
    big, _, _ = _run(vocab, "text", [by_task["text"]])
    halves = [_run(vocab, "text", [b])[0]["mlm"] for b in micro]
    assert abs(sum(halves) / 2 - big["mlm"]) > 1e-4


def test_activation_checkpointing_recomputes_each_layer_and_changes_nothing_else(batches):
    by_task, vocab = batches
    plain_losses, plain_grads, _ = _run(vocab, "pairs", [by_task["pairs"]])
    calls = []
    torch.manual_seed(0)
    model = build_model(ModelConfig(activation_checkpointing=True), vocab, 32)
    # HF checkpoints the layer's forward (hooks of the layer itself stay outside): count a part inside it.
    model.flava.text_model.encoder.layer[0].intermediate.register_forward_hook(lambda *_: calls.append(1))
    losses = accumulate_gradients(FlavaTasks(model), "pairs", [by_task["pairs"]], TrainConfig(), torch.device("cpu"))
    # The paired step runs the text encoder twice (masked and unmasked): 2 forwards, 2 recomputations.
    assert len(calls) == 4
    assert {k: v.item() for k, v in losses.items()} == pytest.approx(plain_losses, rel=1e-6)
    assert_grads_equal(_grads(model), plain_grads, "activation checkpointing")


def test_global_batch_must_be_a_multiple_of_the_per_step_batch():
    cfg = TrainConfig()
    cfg.data.batch_size = 8
    assert accumulation(cfg, world=4) == 1  # global_batch 0: no accumulation
    cfg.optim.global_batch = 96
    assert accumulation(cfg, world=4) == 3
    with pytest.raises(PmdError, match=r"optim.global_batch = 96 .* 8 x 8 = 64"):
        accumulation(cfg, world=8)


def test_fsdp_policy_wraps_each_layer_and_mixes_precision_on_gpu_only():
    from torch.distributed.fsdp import MixedPrecision
    from transformers.models.flava.modeling_flava import FlavaLayer

    cfg = TrainConfig()
    cpu = fsdp_options(cfg, torch.device("cpu"))
    assert cpu["mixed_precision"] is None  # gloo on CPU: fp32, as autocast is off there
    policy = cpu["auto_wrap_policy"]
    model = build_model(ModelConfig(), 100, 32)
    wrapped = [m for m in model.modules() if policy._module_classes & {type(m)}]
    assert wrapped and all(isinstance(m, FlavaLayer) for m in wrapped)
    assert len(wrapped) == 2 * ModelConfig().layers + ModelConfig().multimodal_layers
    gpu = fsdp_options(cfg, torch.device("cuda", 0))["mixed_precision"]
    assert isinstance(gpu, MixedPrecision)
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    assert tuple(gpu._module_classes_to_ignore) == (torch.nn.LayerNorm,)  # LayerNorms in fp32, as the paper
    cfg.bf16 = False
    assert fsdp_options(cfg, torch.device("cuda", 0))["mixed_precision"] is None


def test_flava_full_config_is_the_papers_model_and_recipe_on_an_8_gpu_node():
    cfg = load_train_config(FULL)
    m, o = cfg.model, cfg.optim
    assert (m.hidden_size, m.layers, m.multimodal_layers, m.heads, m.intermediate_size) == (768, 12, 6, 12, 3072)
    assert m.projection_dim == 512 and m.activation_checkpointing
    assert (o.lr, o.weight_decay, o.betas, o.warmup_steps) == (1e-3, 0.1, (0.9, 0.999), 10_000)
    assert o.global_batch == 8192 and cfg.data.mix == {"pairs": 0.70, "image": 0.15, "text": 0.15}
    assert cfg.bf16 and cfg.fsdp
    assert (cfg.data.pair_text_len, cfg.data.text_len) == (77, 512)  # FLAVA: captions 77, text passages 512
    per_gpu = cfg.data.batch_size
    assert accumulation(cfg, world=8) * per_gpu * 8 == 8192
    assert (per_gpu, accumulation(cfg, world=8)) == (256, 4)
    assert accumulation(cfg, world=16) == 2  # two nodes halve the accumulation
    with pytest.raises(PmdError, match="divide exactly"):
        accumulation(cfg, world=3)
    # The model it builds is FLAVA-full's size (the stock FlavaForPreTraining, built on the meta device).
    from transformers import FlavaConfig, FlavaForPreTraining

    with torch.device("meta"):
        model = FlavaForPreTraining(FlavaConfig(**tiny_config(m, 30522, 512)))
    assert model.flava.image_model.config.num_hidden_layers == 12
    assert model.flava.multimodal_model.config.num_hidden_layers == 6
    params = sum(p.numel() for p in model.parameters())
    assert 300e6 < params < 310e6, params  # 303M with the MIM/MLM/MMM/ITM heads, 241M in FlavaModel
