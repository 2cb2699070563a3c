"""The module boundaries docs/Architecture.md describes, checked on the sources' imports: a seam
belongs to its consumer, so the protocol modules never import the providers they are served by."""
import os
import re

import pytest

from conftest import REPO

SOURCES = os.path.join(REPO, "Sources")

# module -> modules it must not import (directly): what each boundary keeps out.
FORBIDDEN = {
    # The SDS server serves from seams it declares with the Workload API (WorkloadServing):
    # neither the cache nor the CA, nor what they link.
    "SDSServer": {"SecretCache", "CertificateAuthority", "X509", "Crypto", "UpstreamCA", "CentralCA", "SDSAgent"},
    # The Workload API shares admission and seams with the SDS server, not the server itself.
    "WorkloadAPI": {"SDSServer", "SecretCache", "CertificateAuthority", "SDSAgent"},
    "WorkloadServing": {"SDSServer", "WorkloadAPI", "SecretCache", "CertificateAuthority", "EnvoyAPI", "SDSAgent"},
    # Providers do not know their consumers.
    "SecretCache": {"SDSServer", "WorkloadAPI", "WorkloadServing", "SDSAgent", "EnvoyAPI"},
    "CertificateAuthority": {"SecretCache", "SDSServer", "WorkloadServing", "SDSAgent"},
    "SDSModel": {"SDSServer", "SecretCache", "CertificateAuthority", "WorkloadServing", "GRPCCore", "NIOCore"},
    # The token's keys are a provider below the CA: they know neither the CA nor the agent.
    "TokenKeys": {"CertificateAuthority", "SecretCache", "SDSServer", "SDSAgent", "UpstreamCA", "CentralCA"},
}


def imports(module):
    found = set()
    for root, _, files in os.walk(os.path.join(SOURCES, module)):
        for name in files:
            if name.endswith(".swift"):
                with open(os.path.join(root, name)) as f:
                    found |= set(re.findall(r"^(?:@\w+(?:\([^)]*\))?\s+)*import\s+(\w+)", f.read(), re.M))
    return found


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_a_module_imports_nothing_across_its_boundary(module):
    assert os.path.isdir(os.path.join(SOURCES, module)), module
    crossing = imports(module) & FORBIDDEN[module]
    assert not crossing, f"{module} imports {sorted(crossing)}: docs/Architecture.md says where the seam goes"


def test_the_architecture_table_lists_every_module_with_the_imports_it_has():
    with open(os.path.join(REPO, "docs", "Architecture.md")) as f:
        rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w-]+)` \| .* \| ([^|]*) \| [^|]* \|$", f.read(), re.M)}
    modules = sorted(os.listdir(SOURCES))
    for module in modules:
        assert module in rows, f"docs/Architecture.md has no row for {module}"
        listed = set(re.findall(r"`(\w+)`", rows[module]))
        actual = (imports(module) & set(modules)) - {module}
        assert listed == actual, f"{module}: the table says it imports {sorted(listed)}, its sources import {sorted(actual)}"
