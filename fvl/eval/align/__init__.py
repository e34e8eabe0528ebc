"""The paper's vision-language alignment analysis (section 4, Figs. 4-5), as ``fvl align``.

With the vision tower and the LLM frozen, only a small projection P of the fused vision features is trained on
image-caption pairs: f_v = normalise(mean_tokens(P(fused features))), f_t = normalise(mean over the caption's
tokens of the LLM's last hidden layer); the loss is the cross-entropy of softmax(f_v f_t^T / temperature)
against the matching pairs. The paper writes the softmax without a temperature; with unit vectors the logits
lie in [-1, 1] and the loss barely moves from log N, so a CLIP-style fixed temperature (default 0.07) is used.

What is reported, and why:

- Held-out numbers. The pairs are split into a training part and a held-out part; P is trained on the first
  only, and each variant is scored on the second: the same contrastive loss over held-out batches, top-1
  image->text retrieval within those batches (chance 1 / batch_size), and the fraction of images whose own
  caption scores above a mismatched one (chance 0.5). A training loss only says how well P fits its pairs.
- Several seeds (P's init, the batch order and the split), reported as mean and std over seeds: a gap between
  variants smaller than the std is noise. All variants of one seed share the split and the batch order.
- P is Linear -> GELU -> Linear with a fixed hidden width (the shape of the model's MLP projector), averaged
  over tokens after the nonlinearity. With a linear P, mean_tokens(P(x)) = P(mean_tokens(x)), so
  token_concat (features concatenated along tokens) would score exactly like avg_pool. P's first layer grows
  with the fused channel width (dbfusion of four features: 4x), so each variant's trainable parameter count
  is reported beside its scores.

The caption pairs are synthetic (fixed data, whatever the run seed) or a JSON-lines file of real ones
(``AlignConfig.captions``). Vision and text features are computed once and shared by all variants and seeds.
"""

from fvl.eval.align.analysis import AlignResult, AlignRun, AlignVariant, alignment_analysis, parse_variant
from fvl.eval.align.metrics import (
    contrastive_loss,
    derangement,
    heldout_loss,
    matched_vs_shuffled,
    pooled,
    projection,
    retrieval_top1,
    split_pairs,
)
from fvl.eval.align.output import AlignFiles, format_table, write_results
from fvl.eval.align.pairs import DATA_SEED, PairFeatures, encode_pairs, read_captions

__all__ = [
    "DATA_SEED", "AlignFiles", "AlignResult", "AlignRun", "AlignVariant", "PairFeatures", "alignment_analysis",
    "contrastive_loss", "derangement", "encode_pairs", "format_table", "heldout_loss", "matched_vs_shuffled",
    "parse_variant", "pooled", "projection", "read_captions", "retrieval_top1", "split_pairs", "write_results",
]  # fmt: skip
