"""Protos/ must use Envoy's exact package, message and field names and numbers.

Compiles Protos/ with protoc and compares every message, field and method with the descriptors
Envoy publishes (PyPI xds-protos), Istio's CSR API with Istio's file, and the SPIFFE Workload API
with the descriptor the SPIFFE project's Python library was built from (PyPI spiffe).
"""
import os
import subprocess

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf import descriptor as _d
import envoy.service.secret.v3.sds_pb2  # noqa: F401  (registers Envoy's descriptors)
import envoy.extensions.transport_sockets.tls.v3.secret_pb2  # noqa: F401
import envoy.extensions.transport_sockets.tls.v3.tls_spiffe_validator_config_pb2  # noqa: F401

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def our_files(tmp_path):
    out = tmp_path / "ours.pb"
    protos = [os.path.relpath(os.path.join(d, f), os.path.join(REPO, "Protos"))
              for d, _, files in os.walk(os.path.join(REPO, "Protos")) for f in files if f.endswith(".proto")]
    subprocess.run(["protoc", "--proto_path", os.path.join(REPO, "Protos"), "--include_imports",
                    "--descriptor_set_out", out, *protos], check=True, timeout=60)
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file


def test_every_message_and_field_matches_envoy(tmp_path):
    envoy_pool = descriptor_pool.Default()
    checked = 0
    for file in our_files(tmp_path):
        if file.package.startswith("google.protobuf") or file.package.startswith("istio.") or file.package == "":
            continue
        for message in file.message_type:
            full = f"{file.package}.{message.name}"
            theirs = envoy_pool.FindMessageTypeByName(full)
            for field in message.field:
                assert field.name in theirs.fields_by_name, f"{full}.{field.name} is not in Envoy's API"
                their = theirs.fields_by_name[field.name]
                assert field.number == their.number, f"{full}.{field.name}: ours {field.number}, Envoy {their.number}"
                assert field.type == their.type, f"{full}.{field.name}: type differs"
                if field.type_name:
                    assert field.type_name.lstrip(".") == their.message_type.full_name, f"{full}.{field.name}"
                checked += 1
        for service in file.service:
            theirs = envoy_pool.FindServiceByName(f"{file.package}.{service.name}")
            for method in service.method:
                their = theirs.methods_by_name[method.name]
                assert method.input_type.lstrip(".") == their.input_type.full_name
                assert method.output_type.lstrip(".") == their.output_type.full_name
                assert method.client_streaming == their.client_streaming
                assert method.server_streaming == their.server_streaming
    assert checked >= 30


# Istio's CSR API (istio/api security/v1alpha1/ca.proto). Istio publishes no descriptor package on
# PyPI, so its definitions are written out here from Istio's file: package, names, numbers, types.
ISTIO = {
    "istio.v1.auth.IstioCertificateRequest": {
        "csr": (1, "TYPE_STRING", "LABEL_OPTIONAL", ""),
        "validity_duration": (3, "TYPE_INT64", "LABEL_OPTIONAL", ""),
        "metadata": (4, "TYPE_MESSAGE", "LABEL_OPTIONAL", "google.protobuf.Struct"),
    },
    "istio.v1.auth.IstioCertificateResponse": {
        "cert_chain": (1, "TYPE_STRING", "LABEL_REPEATED", ""),
    },
}


def test_istio_ca_proto_matches_istio(tmp_path):
    files = [f for f in our_files(tmp_path) if f.package == "istio.v1.auth"]
    assert len(files) == 1 and files[0].name == "security/v1alpha1/ca.proto"
    ours = {f"{files[0].package}.{m.name}": m for m in files[0].message_type}
    assert set(ours) == set(ISTIO)
    for name, fields in ISTIO.items():
        got = {f.name: (f.number, descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
                        descriptor_pb2.FieldDescriptorProto.Label.Name(f.label), f.type_name.lstrip("."))
               for f in ours[name].field}
        assert got == fields, name
    (service,) = files[0].service
    assert service.name == "IstioCertificateService"
    (method,) = service.method
    assert (method.name, method.input_type, method.output_type) == (
        "CreateCertificate", ".istio.v1.auth.IstioCertificateRequest", ".istio.v1.auth.IstioCertificateResponse")
    assert not method.client_streaming and not method.server_streaming


def test_the_workload_api_matches_the_spiffe_projects_descriptor(tmp_path):
    """Protos/spiffe/workload/workload.proto against the descriptor py-spiffe ships (built from
    go-spiffe's workload.proto): no package, same messages, fields, numbers, types and methods."""
    from spiffe._proto import workload_pb2
    theirs = descriptor_pb2.FileDescriptorProto()
    workload_pb2.DESCRIPTOR.CopyToProto(theirs)
    ours = next(f for f in our_files(tmp_path) if f.name == "spiffe/workload/workload.proto")
    assert ours.package == theirs.package == ""

    def shape(file):
        messages = {}
        for message in file.message_type:
            messages[message.name] = {f.name: (f.number, f.type, f.label, f.type_name) for f in message.field}
            for nested in message.nested_type:
                messages[f"{message.name}.{nested.name}"] = {f.name: (f.number, f.type) for f in nested.field}
        methods = {(s.name, m.name): (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                   for s in file.service for m in s.method}
        return messages, methods

    assert shape(ours) == shape(theirs)
    assert len(shape(ours)[1]) == 5
