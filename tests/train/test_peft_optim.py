"""LoRA, QLoRA (4-bit NF4 base) and 8-bit AdamW on CPU, through the same module the Trainer uses."""

import pytest
import torch

from fvl.config import load
from fvl.inputs.collate import Sample, collate
from fvl.train.module import build_module
from fvl.train.optim import build_scheduler, parameter_groups
from tests.fixtures import EXPERIMENTS


def batch_for(model):
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    t = model.template.tokenize(conv, model.tokenizer, model.num_image_tokens)
    return collate(
        [Sample(t.input_ids, t.labels, [torch.randn(3, 64, 64)])] * 2, model.tokenizer.pad_token_id
    )


def one_step(module):
    opt = module.configure_optimizers()["optimizer"]
    batch = batch_for(module.model)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    module.model(batch).loss.backward()
    opt.step()
    return before


def test_lora_trains_only_adapters_and_projector():
    cfg = load(
        EXPERIMENTS / "finetune.yaml",
        ["train.lora.enabled=true", "train.lora.r=4", "init_from=", "train.warmup_ratio=0"],
    )
    module = build_module(cfg)
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("projector.") or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable)
    before = one_step(module)
    moved = [n for n, p in module.model.named_parameters() if n in before and not torch.equal(before[n], p)]
    assert any("lora_B" in n for n in moved) and any(n.startswith("projector.") for n in moved)
    assert module.model.generate([torch.randn(3, 64, 64)], ["What colour?"], max_new_tokens=2)


def qlora_module(tmp_path, *extra):
    """The tiny finetune with its LLM saved to a folder and loaded back in 4-bit NF4, LoRA on top."""
    pytest.importorskip("bitsandbytes")
    from fvl.models import build_model

    llm_dir = tmp_path / "llm"
    tiny = build_model(load("tiny").model)
    tiny.llm.save_pretrained(llm_dir)
    tiny.tokenizer.save_pretrained(llm_dir)
    overrides = ["init_from=", "train.warmup_ratio=0", "model.llm.init=pretrained", f"model.llm.path={llm_dir}",
                 "model.llm.quantization=nf4", "train.lora.enabled=true", *extra]  # fmt: skip
    return build_module(load(EXPERIMENTS / "finetune.yaml", overrides))


def test_qlora_on_a_4bit_nf4_base(tmp_path):
    module = qlora_module(tmp_path)
    assert getattr(module.model.llm, "is_loaded_in_4bit", False) or any(
        type(m).__name__ == "Linear4bit" for m in module.model.llm.modules()
    )
    before = one_step(module)
    assert any(not torch.equal(before[n], p) for n, p in module.model.named_parameters() if "lora_B" in n)


def test_adamw_8bit_step():
    pytest.importorskip("bitsandbytes")
    cfg = load(EXPERIMENTS / "pretrain.yaml", ["train.optimizer=adamw_8bit", "train.warmup_ratio=0"])
    module = build_module(cfg)
    opt = module.configure_optimizers()["optimizer"]
    assert type(opt).__name__ == "AdamW8bit"
    before = one_step(module)
    assert sum(not torch.equal(before[n], p) for n, p in module.model.named_parameters() if n in before) > 0


def test_fused_adamw_takes_the_same_step_as_the_default():
    cfg = load(EXPERIMENTS / "pretrain.yaml", ["train.warmup_ratio=0"])
    torch.manual_seed(0)
    plain = build_module(cfg)
    fused = build_module(
        load(EXPERIMENTS / "pretrain.yaml", ["train.warmup_ratio=0", "train.optimizer=adamw_fused"])
    )
    fused.model.load_state_dict(plain.model.state_dict())
    batch = batch_for(plain.model)
    for module in (plain, fused):
        opt = module.configure_optimizers()["optimizer"]
        module.model(batch).loss.backward()
        opt.step()
    assert opt.defaults["fused"]
    for (name, a), b in zip(plain.model.named_parameters(), fused.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)


def test_clipping_by_the_logged_norm_equals_torch_clip_grad_norm():
    """The module clips with the global norm it logs (one device tensor) - what clip_grad_norm_ does."""
    from unittest import mock

    module = build_module(load(EXPERIMENTS / "pretrain.yaml", ["train.warmup_ratio=0"]))
    module.model(batch_for(module.model)).loss.backward()
    params = [p for p in module.model.parameters() if p.grad is not None]
    expected = [p.grad.clone() for p in params]
    norm = torch.nn.utils.get_total_norm(expected)
    reference = [g * min(1.0, 0.05 / (float(norm) + 1e-6)) for g in expected]  # clip_grad_norm_'s rule
    with mock.patch.object(type(module), "trainer", mock.PropertyMock()), mock.patch.object(module, "log"):
        module.trainer.strategy = object()
        module.on_before_optimizer_step(None)
        assert float(module._grad_norm) == pytest.approx(float(norm), rel=1e-5) and float(norm) > 0.05
        module.configure_gradient_clipping(None, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
    for p, ref in zip(params, reference, strict=True):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-8)


def test_parameter_groups_vision_lr_and_no_decay():
    cfg = load(EXPERIMENTS / "pretrain.yaml", ["train.vision_lr=1e-5", "train.weight_decay=0.1"])
    module = build_module(cfg)
    groups = {g["name"]: g for g in parameter_groups(module.model, cfg.train)}
    assert groups["vision"]["lr"] == 1e-5 and groups["main"]["lr"] == cfg.train.lr
    assert groups["main_no_decay"]["weight_decay"] == 0.0 and groups["main"]["weight_decay"] == 0.1
    n_params = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_params == sum(p.numel() for p in module.model.parameters() if p.requires_grad)


def test_cosine_schedule_with_warmup():
    cfg = load(EXPERIMENTS / "pretrain.yaml", ["trainer.max_steps=100", "train.warmup_ratio=0.1"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg.train, cfg.trainer.max_steps)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert (
        lrs[0] == 0
        and lrs[10] == pytest.approx(1.0)
        and lrs[55] == pytest.approx(0.5, abs=0.02)
        and lrs[-1] < 0.01
    )


def _roundtrip(module, tmp_path):
    """Save the LoRA model, load it back as a plain model, compare logits; then export and init_from."""
    from fvl.convert import export, load_exported
    from fvl.models import load_checkpoint, save_checkpoint
    from fvl.models.checkpoint import read_metadata

    model = module.model.eval()
    batch = batch_for(model)
    with torch.no_grad():
        expected = model(batch).logits.float()
    path = save_checkpoint(model, tmp_path / "lora.safetensors")
    assert read_metadata(path)["fvl_lora"] == "merged"
    plain = load_checkpoint(path).eval()  # strict: every key matches the plain model
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        assert torch.allclose(plain(batch).logits.float(), expected, atol=2e-2, rtol=1e-2)
    exported = load_exported(export(plain, tmp_path / "export")).eval()
    with torch.no_grad():
        assert torch.allclose(exported(batch).logits.float(), plain(batch).logits.float(), atol=1e-5)
    return path


def test_lora_checkpoint_loads_as_a_plain_model_exports_and_inits(tmp_path):
    cfg = load(
        EXPERIMENTS / "finetune.yaml",
        ["train.lora.enabled=true", "train.lora.r=4", "init_from=", "train.warmup_ratio=0", "train.lr=1e-2"],
    )
    module = build_module(cfg)
    one_step(module)  # lora_B leaves zero: the merge changes the weights
    path = _roundtrip(module, tmp_path)
    again = build_module(cfg, init_weights=str(path))  # init_from a LoRA run, LoRA again on top
    assert any("lora_" in n for n, p in again.model.named_parameters() if p.requires_grad)


def test_qlora_checkpoint_loads_as_a_plain_model(tmp_path):
    module = qlora_module(tmp_path, "train.lr=1e-2")
    one_step(module)
    _roundtrip(module, tmp_path)
