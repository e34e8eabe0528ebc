"""Qwen-family LLMs: the presets build at real size on the meta device with float32 trainables; Qwen3's tied
embeddings and qk-norm through freezing, the chunked loss, LoRA, FSDP units and checkpoints."""

import pytest
import torch

from fvl.config import load
from fvl.models import build_model, load_checkpoint, save_checkpoint, set_trainable
from tests.fixtures import stage_trainable
from tests.models.test_loss import mixed_batch, rel_err, small_chunks

QWEN_TOKENIZER = "model.text.tokenizer_path=builtin:qwen-tiny-tokenizer"


@pytest.mark.parametrize(
    ("preset", "layer", "llm_params", "hidden", "tied"),
    [("florence_vl_qwen2.5_7b", "Qwen2DecoderLayer", 7.62e9, 3584, False),
     ("florence_vl_qwen3_4b", "Qwen3DecoderLayer", 4.02e9, 2560, True)],
)  # fmt: skip
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_the_qwen_presets_build_on_the_meta_device_with_float32_trainables(
    preset, layer, llm_params, hidden, tied, stage
):
    cfg = load(
        preset, ["model.vision.init=random", "model.llm.init=random", QWEN_TOKENIZER, f"stage={stage}"]
    )
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = set_trainable(model, cfg.stage.trainable)
    for name, p in model.named_parameters():
        assert p.dtype == (
            torch.float32 if p.requires_grad or name.startswith(("fusion", "projector")) else torch.bfloat16
        ), name
    llm = sum(p.numel() for p in model.llm.parameters())  # a tied table counts once
    assert abs(llm - llm_params) / llm_params < 0.01
    assert counts["llm"]["trainable"] == llm  # both stages train the LLM
    assert model.hidden_size == hidden and model.num_image_tokens == 576
    assert model.llm.config.tie_word_embeddings is tied
    assert (model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight) is tied
    assert layer in {c.__name__ for c in model.fsdp_wrap_classes()}
    assert cfg.model.text.template == (
        "plain" if stage == "pretrain" else "chatml" if "2.5" in preset else "qwen3"
    )


@pytest.fixture(scope="module")
def qwen3():
    torch.manual_seed(0)
    return build_model(load("tiny_qwen3").model)


def test_the_tiny_qwen3_preset_has_qk_norm_and_tied_embeddings(qwen3):
    names = {n for n, _ in qwen3.llm.named_parameters()}
    assert (
        "model.layers.0.self_attn.q_norm.weight" in names
        and "model.layers.0.self_attn.k_norm.weight" in names
    )
    assert "lm_head.weight" not in names  # the tie: one tensor, listed once
    assert qwen3.tokenizer.bos_token is None and qwen3.template.name == "qwen3"


def test_freezing_keeps_the_tie_and_norms_train_without_decay(qwen3):
    from fvl.train.optim import parameter_groups

    set_trainable(qwen3, stage_trainable("finetune"))
    assert qwen3.llm.get_output_embeddings().weight is qwen3.llm.get_input_embeddings().weight
    assert qwen3.llm.get_input_embeddings().weight.requires_grad
    from fvl.config.train import TrainConfig

    groups = {g["name"]: g for g in parameter_groups(qwen3, TrainConfig(weight_decay=0.1))}
    q_norm = qwen3.llm.model.layers[0].self_attn.q_norm.weight
    assert any(p is q_norm for p in groups["main_no_decay"]["params"])


def test_the_chunked_loss_uses_the_tied_head_and_equals_the_full_one(qwen3, monkeypatch):
    batch = mixed_batch(qwen3)
    qwen3.cfg.llm.loss = "full"
    reference = qwen3(batch).loss
    small_chunks(monkeypatch, qwen3.llm.config.vocab_size)
    qwen3.cfg.llm.loss = "chunked"
    chunked = qwen3(batch).loss
    qwen3.cfg.llm.loss = "auto"
    assert rel_err(chunked, reference) < 1e-5
    assert qwen3.llm.get_output_embeddings().weight is qwen3.llm.get_input_embeddings().weight


def test_lora_on_qwen3_adapts_attention_and_mlp_but_not_the_tied_head(qwen3):
    import copy

    from fvl.config.train import LoraConfig
    from fvl.train.adapters import apply_lora

    model = copy.deepcopy(qwen3)
    apply_lora(model, LoraConfig(enabled=True, r=4))
    adapted = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.llm.named_parameters() if "lora_A" in n
    }
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    counts = set_trainable(model, stage_trainable("finetune"), llm_adapters_only=True)
    assert counts["llm"]["trainable"] > 0
    assert not model.llm.get_input_embeddings().weight.requires_grad


def test_tied_weights_load_whether_a_file_holds_one_name_or_both(qwen3, tmp_path):
    from fvl.models.checkpoint import load_state_strict

    path = save_checkpoint(qwen3, tmp_path / "q.safetensors")  # safetensors keeps one name of the tie
    again = load_checkpoint(path)
    assert torch.equal(again.llm.lm_head.weight, qwen3.llm.lm_head.weight)
    assert again.llm.lm_head.weight is again.llm.get_input_embeddings().weight
    state = {k: v.clone() for k, v in qwen3.state_dict().items()}  # a gathered FSDP state: both names
    assert "llm.lm_head.weight" in state and "llm.model.embed_tokens.weight" in state
    load_state_strict(again, state)
    with pytest.raises(RuntimeError, match="Unexpected"):
        load_state_strict(again, {**state, "llm.extra.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Missing"):
        load_state_strict(again, {k: v for k, v in state.items() if not k.startswith("projector.")})


def test_the_export_loads_in_plain_transformers_with_the_tie_and_the_same_logits(qwen3, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fvl.convert.export import export

    folder = export(qwen3, tmp_path / "export")
    llm = AutoModelForCausalLM.from_pretrained(folder / "llm").eval()
    assert llm.config.tie_word_embeddings and llm.lm_head.weight is llm.get_input_embeddings().weight
    tok = AutoTokenizer.from_pretrained(folder / "llm")
    assert tok.convert_tokens_to_ids("<image>") == qwen3.image_token_id and tok.bos_token is None
    ids = torch.tensor([tok("<|im_start|>user\nWhat colour?<|im_end|>\n").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(llm(ids).logits, qwen3.llm.eval()(ids).logits)
