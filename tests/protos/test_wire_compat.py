"""Wire-compatibility check: Convoy's protos vs. tritonclient's descriptors.

Our .proto files are compiled into a FileDescriptorSet and inspected as plain
descriptor_pb2 messages only. They are never loaded into the default
descriptor pool, because tritonclient's generated modules register the same
``inference.*`` symbols there.
"""

from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc")
protoc = pytest.importorskip("grpc_tools.protoc")

from google.protobuf import descriptor_pb2  # noqa: E402
from tritonclient.grpc import model_config_pb2, service_pb2  # noqa: E402

PROTOS_DIR = Path(__file__).resolve().parents[2] / "protos"
PROTO_FILES = ("grpc_service.proto", "model_config.proto")

FDP = descriptor_pb2.FieldDescriptorProto


def _norm(type_name):
    return type_name.lstrip(".")


def _enum_name(enum_type, number):
    return enum_type.values_by_number[number].name


def _compile_ours(tmp_dir):
    out = tmp_dir / "convoy.desc"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS_DIR}",
        f"--descriptor_set_out={out}",
        "--include_imports",
    ] + [str(PROTOS_DIR / name) for name in PROTO_FILES]
    rc = protoc.main(args)
    assert rc == 0, f"protoc failed (rc={rc}) compiling {PROTO_FILES}"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds


def _triton_files():
    files = []
    for module in (service_pb2, model_config_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        fdp.ParseFromString(module.DESCRIPTOR.serialized_pb)
        files.append(fdp)
    return files


def _index(files):
    """Map fully-qualified names to message, enum and service protos."""
    messages, enums, services = {}, {}, {}

    def walk_msg(prefix, msg):
        full = f"{prefix}.{msg.name}" if prefix else msg.name
        messages[full] = msg
        for nested in msg.nested_type:
            walk_msg(full, nested)
        for enum in msg.enum_type:
            enums[f"{full}.{enum.name}"] = enum

    for f in files:
        pkg = f.package
        for msg in f.message_type:
            walk_msg(pkg, msg)
        for enum in f.enum_type:
            enums[f"{pkg}.{enum.name}" if pkg else enum.name] = enum
        for svc in f.service:
            services[f"{pkg}.{svc.name}" if pkg else svc.name] = svc
    return messages, enums, services


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    fds = _compile_ours(tmp_path_factory.mktemp("protos"))
    return _index(fds.file)


@pytest.fixture(scope="module")
def triton():
    return _index(_triton_files())


def _oneof_name(msg, field):
    if not field.HasField("oneof_index"):
        return None
    return msg.oneof_decl[field.oneof_index].name


def test_packages_and_files():
    triton_names = {f.name for f in _triton_files()}
    assert triton_names <= set(PROTO_FILES), triton_names - set(PROTO_FILES)
    for f in _triton_files():
        assert f.package == "inference", f.name


def test_messages_match(ours, triton):
    our_msgs = ours[0]
    problems = []
    for full, ref in sorted(triton[0].items()):
        mine = our_msgs.get(full)
        if mine is None:
            problems.append(f"message {full}: missing")
            continue
        if ref.options.map_entry != mine.options.map_entry:
            problems.append(f"message {full}: map_entry differs")
        by_name = {f.name: f for f in mine.field}
        for rf in ref.field:
            where = f"message {full} field {rf.name}"
            mf = by_name.get(rf.name)
            if mf is None:
                problems.append(f"{where}: missing")
                continue
            if mf.number != rf.number:
                problems.append(f"{where}: number {mf.number} != {rf.number}")
            if mf.type != rf.type:
                problems.append(
                    f"{where}: type {_enum_name(FDP.Type.DESCRIPTOR, mf.type)}"
                    f" != {_enum_name(FDP.Type.DESCRIPTOR, rf.type)}"
                )
            if mf.label != rf.label:
                problems.append(
                    f"{where}: label {_enum_name(FDP.Label.DESCRIPTOR, mf.label)}"
                    f" != {_enum_name(FDP.Label.DESCRIPTOR, rf.label)}"
                )
            if _norm(mf.type_name) != _norm(rf.type_name):
                problems.append(f"{where}: type_name {mf.type_name!r} != {rf.type_name!r}")
            if mf.proto3_optional != rf.proto3_optional:
                problems.append(f"{where}: proto3_optional differs")
            if _oneof_name(mine, mf) != _oneof_name(ref, rf):
                problems.append(f"{where}: oneof {_oneof_name(mine, mf)!r} != {_oneof_name(ref, rf)!r}")
    assert not problems, "\n".join(problems)


def test_enums_match(ours, triton):
    our_enums = ours[1]
    problems = []
    for full, ref in sorted(triton[1].items()):
        mine = our_enums.get(full)
        if mine is None:
            problems.append(f"enum {full}: missing")
            continue
        by_name = {v.name: v.number for v in mine.value}
        for rv in ref.value:
            if rv.name not in by_name:
                problems.append(f"enum {full} value {rv.name}: missing")
            elif by_name[rv.name] != rv.number:
                problems.append(f"enum {full} value {rv.name}: number {by_name[rv.name]} != {rv.number}")
    assert not problems, "\n".join(problems)


def test_service_matches(ours, triton):
    our_svcs = ours[2]
    assert "inference.GRPCInferenceService" in triton[2]
    problems = []
    for full, ref in sorted(triton[2].items()):
        mine = our_svcs.get(full)
        if mine is None:
            problems.append(f"service {full}: missing")
            continue
        by_name = {m.name: m for m in mine.method}
        for rm in ref.method:
            where = f"service {full} method {rm.name}"
            mm = by_name.get(rm.name)
            if mm is None:
                problems.append(f"{where}: missing")
                continue
            if _norm(mm.input_type) != _norm(rm.input_type):
                problems.append(f"{where}: input {mm.input_type} != {rm.input_type}")
            if _norm(mm.output_type) != _norm(rm.output_type):
                problems.append(f"{where}: output {mm.output_type} != {rm.output_type}")
            if mm.client_streaming != rm.client_streaming:
                problems.append(f"{where}: client_streaming differs")
            if mm.server_streaming != rm.server_streaming:
                problems.append(f"{where}: server_streaming differs")
    assert not problems, "\n".join(problems)


def test_raw_contents_field_numbers(ours):
    msgs = ours[0]
    req = {f.name: f for f in msgs["inference.ModelInferRequest"].field}
    resp = {f.name: f for f in msgs["inference.ModelInferResponse"].field}
    assert req["raw_input_contents"].number == 7
    assert resp["raw_output_contents"].number == 6
