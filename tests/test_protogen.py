"""The committed generated admin API code matches protos/ (regenerated with the same post-processing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from extauth import _protogen


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text(encoding="utf-8")
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_generated_code_is_up_to_date(tmp_path: Path) -> None:
    written = _protogen.generate(tmp_path)
    assert Path("extauth/admin/v1/admin_pb2_grpc.py") in written
    fresh = _tree(tmp_path)
    committed = _tree(_protogen.GENERATED)
    stale = sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    assert not stale, f"stale generated code: {stale}; run `make proto` (python -m extauth._protogen)"


def test_generated_grpc_module_imports_through_the_package(tmp_path: Path) -> None:
    grpc_py = (_protogen.GENERATED / "extauth/admin/v1/admin_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from extauth._generated.extauth.admin.v1 import admin_pb2" in grpc_py
    assert "\nfrom extauth.admin" not in grpc_py
    assert (_protogen.GENERATED / "extauth/admin/v1/admin_pb2.pyi").read_text().startswith(
        "# mypy: ignore-errors")
    # Importable in a fresh interpreter, and the service is the one the server registers.
    code = ("from extauth._generated.extauth.admin.v1 import admin_pb2, admin_pb2_grpc\n"
            "print(admin_pb2.DESCRIPTOR.services_by_name['Admin'].full_name)\n"
            "assert hasattr(admin_pb2_grpc, 'AdminStub')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "extauth.admin.v1.Admin"


def test_main_writes_into_a_given_directory(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "extauth._protogen", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert "admin_pb2.py" in out.stdout
    assert (tmp_path / "extauth/admin/v1/admin_pb2.py").is_file()
    assert (tmp_path / "__init__.py").is_file()
