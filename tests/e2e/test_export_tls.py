"""TLS for OTLP export, against receivers with certificates from a private
CA made with openssl: the CA must be trusted through the OTEL variables
(or refused without it), and a backend that asks for a client certificate
gets one. Driven through `freezeframe export`, so no freeze is needed."""

import os
import subprocess
import time

import pytest

from conftest import BINARY
from otlp_receiver import GrpcReceiver, HttpReceiver


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """CA, a server certificate for 127.0.0.1 and a client certificate."""
    directory = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "1", "-subj", "/CN=freezeframe test CA", cwd=directory)
    for name, usage, subject_alt_name in [("server", "serverAuth", "IP:127.0.0.1"), ("client", "clientAuth", "DNS:freezeframe")]:
        (directory / f"{name}.ext").write_text(
            f"subjectAltName={subject_alt_name}\nbasicConstraints=CA:FALSE\n"
            f"keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
        )
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=directory)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=directory)
    return directory


@pytest.fixture(scope="module")
def saved_profile(tmp_path_factory):
    """A real capture of a sleeping process, as `freezeframe capture` saves it."""
    path = tmp_path_factory.mktemp("capture") / "profile.pb.gz"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        subprocess.run([str(BINARY), "capture", "--pid", str(sleeper.pid), "--duration", "1s", "--output", str(path)],
                       check=True, capture_output=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    return path


def export(profile, endpoint: str, protocol: str, **env):
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "FREEZEFRAME_"))}
    environment.update(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_EXPORTER_OTLP_PROTOCOL=protocol, **env)
    return subprocess.run([str(BINARY), "export", "--deadline", "3s", str(profile)],
                          capture_output=True, text=True, env=environment, timeout=60)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_private_ca_is_trusted_only_when_configured(certificates, saved_profile, protocol):
    tls = (str(certificates / "server.pem"), str(certificates / "server.key"))
    receiver = GrpcReceiver(tls=tls) if protocol == "grpc" else HttpReceiver(tls=tls)
    endpoint = f"https://127.0.0.1:{receiver.port}"
    try:
        untrusted = export(saved_profile, endpoint, protocol)
        assert untrusted.returncode != 0
        assert not receiver.accepted(), "nothing gets through to a server we cannot verify"
        assert "certificate" in untrusted.stderr.lower() or "tls" in untrusted.stderr.lower(), untrusted.stderr

        trusted = export(saved_profile, endpoint, protocol, OTEL_EXPORTER_OTLP_PROFILES_CERTIFICATE=str(certificates / "ca.pem"))
        assert trusted.returncode == 0, trusted.stderr
        [received] = receiver.wait_for(1, timeout=10)
    finally:
        receiver.stop()
    [profile] = [p for r in received.request.resource_profiles for s in r.scope_profiles for p in s.profiles]
    assert profile.samples, "a real capture came through"


def test_a_backend_that_wants_a_client_certificate_gets_one(certificates, saved_profile):
    import grpc
    from concurrent import futures
    from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2 as service_pb2
    from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc as service_grpc

    peers = []

    class Servicer(service_grpc.ProfilesServiceServicer):
        def Export(self, request, context):
            peers.append(context.auth_context().get("x509_common_name"))
            return service_pb2.ExportProfilesServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_grpc.add_ProfilesServiceServicer_to_server(Servicer(), server)
    credentials = grpc.ssl_server_credentials(
        [((certificates / "server.key").read_bytes(), (certificates / "server.pem").read_bytes())],
        root_certificates=(certificates / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        endpoint = f"https://127.0.0.1:{port}"
        ca = {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(certificates / "ca.pem")}
        anonymous = export(saved_profile, endpoint, "grpc", **ca)
        assert anonymous.returncode != 0 and not peers
        identified = export(
            saved_profile, endpoint, "grpc", **ca,
            OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE=str(certificates / "client.pem"),
            OTEL_EXPORTER_OTLP_CLIENT_KEY=str(certificates / "client.key"),
        )
        assert identified.returncode == 0, identified.stderr
        deadline = time.monotonic() + 5
        while not peers and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.stop(grace=0).wait()
    assert peers == [[b"client"]]
