"""Regional compilation of the LLM (``model.llm.compile``): every decoder layer compiled in place, the same
loss and gradients as eager, names unchanged (checkpoints and FSDP units), with gradient checkpointing."""

import copy

import torch

from fvl.models import build_model, set_trainable
from fvl.models.llm import compile_decoder_layers, decoder_layers
from tests.fixtures import stage_trainable, tiny_cfg
from tests.models.test_trainable import one_batch


def test_compiled_layers_give_eager_s_loss_and_gradients_and_keep_their_names():
    torch.manual_seed(0)
    eager = build_model(tiny_cfg("llm.gradient_checkpointing=true"))
    set_trainable(eager, stage_trainable("finetune"))
    compiled = copy.deepcopy(eager)
    assert compile_decoder_layers(compiled.llm, backend="aot_eager") == len(decoder_layers(eager.llm)) == 4
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(compiled.llm))
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no _orig_mod. in checkpoints
    assert {type(m) for m in compiled.fsdp_wrap_classes()} == {type(m) for m in eager.fsdp_wrap_classes()}
    batch = one_batch(eager)
    for model in (eager, compiled):
        model.train()
        model.zero_grad()
        model(batch).loss.backward()
    torch.testing.assert_close(compiled(batch).loss, eager(batch).loss)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_config_flag_compiles_the_layers():
    model = build_model(tiny_cfg("llm.compile=true"))
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model.llm))
