"""The protos serve code generators of other languages, and say the limits the coordinator holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from shoal.config import NodeSettings
from shoal.v1 import admin_pb2, gateway_pb2, locks_pb2, node_pb2, task_pb2, tasks_pb2
from shoal.validation import Limits

PROTOS = Path(__file__).parents[2] / "protos" / "shoal" / "v1"
MODULES = [admin_pb2, gateway_pb2, locks_pb2, node_pb2, task_pb2, tasks_pb2]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.DESCRIPTOR.name)
def test_every_file_names_its_package_for_other_languages(module: object) -> None:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)  # type: ignore[attr-defined]
    options = proto.options

    # One Go package for all files, importable without --go_opt=M flags.
    assert options.go_package == "github.com/shoal-mesh/shoal/gen/go/shoal/v1;shoalv1"
    assert options.java_package == "dev.shoal.v1"
    assert options.java_multiple_files
    assert options.java_outer_classname.endswith("Proto")
    assert options.csharp_namespace == "Shoal.V1"
    assert options.objc_class_prefix == "SHL"
    assert options.php_namespace == "Shoal\\V1"
    assert options.ruby_package == "Shoal::V1"


def test_go_code_generates_without_import_flags(tmp_path: Path) -> None:
    """Real protoc-gen-go and protoc-gen-go-grpc (Debian packages, installed by .ci/run)."""
    for plugin in ("protoc-gen-go", "protoc-gen-go-grpc"):
        assert shutil.which(plugin), f"{plugin} is not installed (apt-get install {plugin})"
    protos = sorted(str(p) for p in PROTOS.glob("*.proto"))
    outputs = [f"--go_out={tmp_path}", f"--go-grpc_out={tmp_path}"]
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS.parents[1]}", *outputs, *protos],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    package = tmp_path / "github.com/shoal-mesh/shoal/gen/go/shoal/v1"
    made = sorted(p.name for p in package.iterdir())
    assert "tasks.pb.go" in made and "tasks_grpc.pb.go" in made and "node_grpc.pb.go" in made
    assert "package shoalv1\n" in (package / "task.pb.go").read_text()


def test_outer_class_names_differ() -> None:
    """Java puts every file's outer class in one package: two alike would clash."""
    names = [m.DESCRIPTOR.GetOptions().java_outer_classname for m in MODULES]
    assert len(set(names)) == len(names)


def test_protos_state_the_default_limits() -> None:
    limits = Limits()
    task = (PROTOS / "task.proto").read_text()
    tasks = (PROTOS / "tasks.proto").read_text()

    assert limits.max_spec_bytes == 1 << 20 and "at most 1 MiB serialized" in task
    assert limits.max_rendered_spec_bytes == 4 << 20 and "4 MiB once upstream" in task
    assert f"at most {limits.max_string} characters (max_string)" in task
    assert f"at most {limits.max_labels}\n//   entries each (max_labels)" in task
    assert f"depends_on: at most {limits.max_depends_on} upstream tasks" in task
    assert f"retry.max_attempts: at most {limits.max_attempts}" in task
    assert limits.max_result_bytes == 1 << 20 and "at most 1 MiB of a result" in task
    node_cap = NodeSettings.model_fields["max_output_bytes"].default
    assert node_cap == 8 << 20 and "at most 8 MiB of a task's output" in task
    assert f"at most {limits.max_batch:,} (the coordinator's max_batch)" in tasks
    assert f"at most {limits.max_watch_tasks:,} (max_watch_tasks)" in tasks
