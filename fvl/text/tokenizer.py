"""The LLM tokenizer plus fvl's image placeholder token (one id per image, expanded later)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(
    path: str | Path, image_token: str = "<image>", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load from a local folder, add ``image_token`` as a special token (never split, never merged) and
    make sure a pad token exists (the EOS token when the tokenizer has none, as for Llama 3). A folder's own
    tokenizer code runs only with ``trust_remote_code`` (``model.llm.trust_remote_code``)."""
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if image_token not in tok.get_vocab():
        tok.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.image_token = image_token
    tok.image_token_id = tok.convert_tokens_to_ids(image_token)
    return tok
