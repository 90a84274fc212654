"""A node's own model files: the tensors a span needs are copied from them when their bytes are the ones the
manifest names, and from nowhere else."""

from pathlib import Path

from duskpool.weights.gguf import GGUFFile
from duskpool.weights.local import Wanted, copy_from_local, model_paths
from duskpool.weights.store import TensorStore, tensor_hashes
from tests.conftest import Q, write_tiny_llama


def manifest(path: Path, cache: Path) -> list[Wanted]:
    file = GGUFFile(path)
    return [Wanted(name, sha, file.tensors[name].nbytes) for name, sha in tensor_hashes(file, cache).items()]


def test_a_span_is_copied_from_the_same_model_and_not_from_another(tmp_path):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    same = write_tiny_llama(models / "sub" / "same.gguf", Q.Q8_0, dim=64, ffn=128, vocab=64)
    other = write_tiny_llama(models / "other.gguf", Q.Q8_0, dim=64, ffn=128, vocab=64, seed=1)
    (models / "notes.txt").write_text("not a model")
    span = manifest(same, tmp_path / "hashes")
    assert sorted(model_paths([models])) == [other, same]

    store = TensorStore(tmp_path / "store")
    assert copy_from_local(store, span, [other]) == 0  # same names and sizes, other bytes: nothing taken
    assert not any(store.has(t.sha256) for t in span)

    taken = copy_from_local(store, span, model_paths([models]))
    assert taken == sum(t.nbytes for t in span)
    assert all(store.verified(t.sha256, t.nbytes) for t in span)
    assert copy_from_local(store, span, model_paths([models])) == 0  # held already: nothing read again
