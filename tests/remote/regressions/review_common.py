import io
import sys
import tarfile

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))


def write_tar(path, keys, payload=b"x"):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for k in keys:
            for ext, data in (("txt", (k + ":").encode() + payload), ("cls", b"1")):
                ti = tarfile.TarInfo(f"{k}.{ext}")
                ti.size = len(data)
                ti.mtime = 0
                t.addfile(ti, io.BytesIO(data))
