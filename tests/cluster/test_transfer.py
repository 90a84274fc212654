"""What a node is told about the model: the configuration its span needs, nothing that names the model."""

import json

from duskpool.cluster.transfer import WeightSender
from duskpool.weights.gguf import GGUFFile
from duskpool.weights.store import config_metadata


def test_nodes_get_the_family_and_its_shape_but_no_names_and_no_tokenizer(bundled_model):
    file = GGUFFile(bundled_model)
    assert file.metadata.get("general.name") and "tokenizer.ggml.tokens" in file.metadata  # there to be withheld
    sent = json.loads(WeightSender(file, [(1, 10)], progress=False).manifests[(1, 10)].metadata_json)
    assert sent == json.loads(json.dumps(config_metadata(file), default=str))
    assert sent["general.architecture"] == "llama" and sent["llama.block_count"] == 30
    withheld = [k for k in sent if k.startswith(("tokenizer.", "general.")) and k != "general.architecture"]
    assert not withheld
