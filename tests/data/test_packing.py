"""Padding-free packing: whole samples per row, images in placeholder order, and the same loss as the
samples unpacked."""

import pytest
import torch

from fvl.data.packing import collate_packed, pack_rows
from fvl.inputs.collate import collate
from fvl.models import build_processor
from fvl.synthetic import generate
from tests.fixtures import tiny_cfg


def test_rows_hold_whole_samples_within_capacity():
    lengths = [700, 120, 900, 50, 400, 1000, 30]
    rows = pack_rows(lengths, 1024)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    assert len(rows) == 4  # 3200 tokens: the fewest rows of 1024 that fit them
    assert pack_rows([2000, 10], 1024) == [[0], [1]]  # a sample longer than a row gets its own


@pytest.fixture(scope="module")
def samples():
    processor = build_processor(tiny_cfg(), "square")
    out = []
    for i in range(7):
        s = generate(i)
        task = "caption" if i % 2 else "qa"  # unequal lengths
        out.append(processor(s.conversations(task), [s.image], s.id))
    # a text-only sample among them
    out.append(
        processor([{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi there."}], [], "t")
    )
    return processor, out


def test_packed_batch_keeps_placeholders_whole_and_images_in_order(samples):
    processor, batch_samples = samples
    cap = 2 * max(len(s.input_ids) for s in batch_samples)
    packed = collate_packed(batch_samples, cap, processor.pad_token_id)
    assert packed["input_ids"].shape[0] < len(batch_samples) and "attention_mask" not in packed
    image_id = processor.tokenizer.image_token_id
    for row in packed["input_ids"]:
        assert int((row == image_id).sum()) % processor.image_tokens == 0  # no image split across rows
    by_id = {s.id: s for s in batch_samples}
    expected = torch.stack([im for sid in packed["ids"] for im in by_id[sid].images])
    assert torch.equal(packed["pixel_values"], expected)
    starts = (packed["position_ids"] == 0).sum().item()
    assert starts >= len(batch_samples)  # each sample restarts its positions (padding is one more)


@pytest.mark.parametrize("llm", ["phi3", "llama"])
def test_packed_loss_equals_the_unpacked_loss(tiny_model, samples, llm):
    processor, batch_samples = samples
    if llm == "llama":
        from fvl.models import build_model
        from tests.fixtures import TINY_LLAMA

        torch.manual_seed(0)
        tiny_model = build_model(tiny_cfg(llm_arch=TINY_LLAMA)).eval()
    cap = 2 * max(len(s.input_ids) for s in batch_samples)
    plain = collate(batch_samples, processor.pad_token_id)
    packed = collate_packed(batch_samples, cap, processor.pad_token_id)
    assert (packed["labels"] != -100).sum() == (plain["labels"] != -100).sum()  # the same targets
    with torch.no_grad():
        a, b = tiny_model(plain).loss, tiny_model(packed).loss
    assert float(b) == pytest.approx(float(a), rel=1e-5)
    # and attention really stays within a sample: without the restarts the later samples of a row see the
    # earlier ones (their logits change; the mean loss of a random tiny model can move by less than 1e-4)
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    with torch.no_grad():
        change = (tiny_model(leaky).logits - tiny_model(packed).logits).abs().max()
    assert change > 1e-3, change


def test_under_flash_attention_a_micro_batch_packs_into_the_one_row_transformers_keeps_apart(samples):
    """transformers sends packed rows to flash-attention's variable-length kernel only for a batch of one row
    (``_is_packed_sequence``); with several rows it calls the plain causal kernel and samples attend to each
    other. Under ``flash_attention_2`` the reader packs a micro batch into one row, which that check takes."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    from fvl.data.reader import ONE_ROW, batch_of

    processor, batch_samples = samples
    rows = batch_of(
        list(batch_samples), processor.pad_token_id, {}, pack=2 * max(len(s.input_ids) for s in batch_samples)
    )
    assert rows["input_ids"].shape[0] > 1 and not _is_packed_sequence(
        rows["position_ids"], rows["input_ids"].shape[0]
    )
    one = batch_of(list(batch_samples), processor.pad_token_id, {}, pack=ONE_ROW)
    assert one["input_ids"].shape == (1, sum(len(s.input_ids) for s in batch_samples))
    assert _is_packed_sequence(one["position_ids"], 1)  # the variable-length path
    assert int((one["position_ids"] == 0).sum()) == len(batch_samples)  # one sequence per sample


def test_the_datamodule_packs_one_row_only_under_flash_attention():
    from fvl.config import load
    from fvl.data.datamodule import build_datamodule

    flash = build_datamodule(
        load("tiny", ["data.packing=true", "model.llm.attn_implementation=flash_attention_2"])
    )
    sdpa = build_datamodule(load("tiny", ["data.packing=true"]))
    assert flash.one_row_packing and not sdpa.one_row_packing
