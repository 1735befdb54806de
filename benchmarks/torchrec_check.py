"""Check mmload.to_kjt against real TorchRec: a Parquet data set with two id-list columns is read
by a Loader, its Jagged fields become a KeyedJaggedTensor, and TorchRec's EmbeddingBagCollection
pools them; the pooled embeddings must equal sums over the ids read back with pyarrow.

Needs torchrec and the fbgemm-gpu(-cpu) build made for the installed torch (fbgemm 1.8 for
torch 2.13, 1.9 for 2.14). torchrec declares the CUDA fbgemm-gpu package, so on a CPU machine
install it without dependencies (tests/test_torchrec.py does this in its own venv):

    pip install "fbgemm-gpu-cpu==1.8.0" && pip install --no-deps "torchrec==1.8.0"
    pip install tensordict "torchmetrics==1.0.3" pyre-extensions
    python benchmarks/torchrec_check.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import mmload


def main() -> int:
    import torchrec
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    tmp = Path(tempfile.mkdtemp())
    n = 50
    hist = [[(i * 7 + j) % 100 for j in range(i % 5)] for i in range(n)]
    cats = [[(i + j) % 20 for j in range(1 + i % 2)] for i in range(n)]
    pq.write_table(
        pa.table(
            {
                "__key__": [f"u{i:03d}" for i in range(n)],
                "hist": pa.array(hist, pa.list_(pa.int64())),
                "cats": pa.array(cats, pa.list_(pa.int32())),
            }
        ),
        tmp / "ids.parquet",
        row_group_size=16,
    )
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name="t_hist", embedding_dim=8, num_embeddings=100, feature_names=["hist"]
            ),
            EmbeddingBagConfig(
                name="t_cats", embedding_dim=8, num_embeddings=20, feature_names=["cats"]
            ),
        ],
        device=torch.device("cpu"),
    )
    checked = 0
    with mmload.Loader(str(tmp / "ids.parquet"), batch_size=8, shuffle=True) as ld:
        for b in ld:
            kjt = mmload.to_kjt(b, ["hist", "cats"])
            assert isinstance(kjt, KeyedJaggedTensor)
            d = kjt.to_dict()
            for k in ("hist", "cats"):
                assert d[k].values().tolist() == b[k].values.tolist(), k
                assert d[k].lengths().tolist() == b[k].lengths().tolist(), k
            pooled = ebc(kjt).to_dict()
            for j, key in enumerate(b["__key__"]):
                i = int(key[1:])
                for k, ids, table in (("hist", hist[i], "t_hist"), ("cats", cats[i], "t_cats")):
                    w = ebc.embedding_bags[table].weight
                    want = w[ids].sum(0) if ids else torch.zeros(8)
                    assert torch.allclose(pooled[k][j], want, atol=1e-6), (key, k)
                checked += 1
    print(
        f"torchrec {torchrec.__version__}, torch {torch.__version__}: to_kjt matched TorchRec's "
        f"KeyedJaggedTensor and EmbeddingBagCollection on {checked} samples"
    )
    return 0 if checked == n else 1


if __name__ == "__main__":
    sys.exit(main())
