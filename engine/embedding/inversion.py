"""Training a textual-inversion embedding: `network.type = "embedding"`.

The UNet and both text encoders stay frozen; only the new token vectors (engine/embedding/vectors.py) train, in every text
encoder at once (CLIP-L and bigG for SDXL). Captions keep their text: the word `network.token` (default: the
dataset trigger) is spelled as the placeholders, so the vectors learn what that word shows. The run's files are
embeddings (`emb_params`, or `clip_l` / `clip_g`), named <output.name>.safetensors, so AUTOMATIC1111 uses them by
that name and ComfyUI as `embedding:<output.name>`; previews during training use the same spellings.
"""
import re

import torch

from gesso.engine.embedding.vectors import Embeddings, file_tensors, save_embedding
from gesso.errors import TrainError

ARCHITECTURE_SUFFIX = "/textual-inversion"  # kohya sai_model_spec ADAPTER_TEXTUAL_INVERSION


class EmbeddingNetwork:
    """What the training loop trains, saves and resumes in place of a LoRA network."""

    modules: dict = {}  # no LoRA modules: the loop's per-module LoRA code finds nothing to do

    def __init__(self, embeddings: Embeddings, name: str):
        self.embeddings, self.name = embeddings, name

    def parameters(self) -> list[torch.nn.Parameter]:
        return [table.vectors for table in self.embeddings.tables]

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The file's tensors (the name is kept for the loop, which saves any network through this)."""
        return file_tensors(self.embeddings.vectors(self.name), dtype)

    def named_tensors(self) -> dict[str, torch.nn.Parameter]:
        """The live vectors by their file keys (in parameters' order, as load_state pairs them)."""
        return dict(zip(self.kohya_state_dict(), self.parameters()))

    def load_state(self, saved: dict[str, torch.Tensor], source: str) -> None:
        """The vectors of a resumed run's state, after checking that they fit."""
        mine = self.kohya_state_dict()
        if saved.keys() != mine.keys() or any(saved[k].shape != mine[k].shape for k in mine):
            raise TrainError(f"{source}: holds {sorted(saved)[:3]} with other shapes than this run's embedding "
                             f"{ {k: tuple(v.shape) for k, v in mine.items()} }: the state belongs to another network")
        for param, key in zip(self.parameters(), mine):
            param.data.copy_(saved[key])

    def write(self, path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        save_embedding(path, tensors, embedding_metadata(metadata))

    def remove(self) -> None:
        self.embeddings.remove()


def embedding_metadata(meta: dict[str, str]) -> dict[str, str]:
    """The run's metadata without the LoRA-only `ss_network_*` keys, its ModelSpec architecture a textual inversion."""
    out = {k: v for k, v in meta.items() if not k.startswith("ss_network_")}
    out["modelspec.architecture"] = meta["modelspec.architecture"].rsplit("/", 1)[0] + ARCHITECTURE_SUFFIX
    return out


def init_vectors(sd, tokenizers: list, word: str, count: int) -> list[torch.Tensor]:
    """Each encoder's start: row i = the embedding of the word's token i·k // n (k tokens), AUTOMATIC1111's rule."""
    out = []
    for encoder, tok in zip(sd.text_encoders, tokenizers):
        ids = tok(word, add_special_tokens=False).input_ids
        if not ids:
            raise TrainError(f"network.init_word = {word!r}: no tokens; choose a word close to what is trained")
        table = encoder.transformer.text_model.embeddings.token_embedding if hasattr(encoder, "transformer") \
            else encoder.model.token_embedding
        weight = table.weight if isinstance(table, torch.nn.Embedding) else table.base.weight
        rows = weight.detach().float()[torch.tensor(ids, device=weight.device)]  # (k, width)
        out.append(torch.stack([rows[i * len(ids) // count] for i in range(count)]))
    return out


def spellings(token: str, file_name: str) -> list[str]:
    """The spellings of the trained embedding: the caption word (network.token, else the dataset trigger, else the
    file name), then the file name (output.name)."""
    return list(dict.fromkeys([token or file_name, file_name]))


def inject(sd, tokenizers: list, names: list[str], init_word: str, count: int, captions: list[str]) -> EmbeddingNetwork:
    """New trainable vectors of `count` rows (network.num_vectors) per text encoder, starting from `init_word`'s
    (network.init_word) and spelled as `names` (spellings)."""
    if not any(re.search(rf"(?<![\w:-]){re.escape(names[0])}(?![\w-])", c) for c in captions):
        raise TrainError(f"network.token {names[0]!r} appears in no caption: nothing would train the embedding "
                         "(set dataset.trigger, or network.token to a word the captions hold)")
    start = init_vectors(sd, tokenizers, init_word, count)
    embeddings = Embeddings(sd, tokenizers)
    if embeddings.count:
        raise TrainError("the model already carries embeddings; train one embedding per run")
    embeddings.add(names, start, trainable=True)
    return EmbeddingNetwork(embeddings, names[0])
