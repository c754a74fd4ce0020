"""kvxfer as a vLLM 0.33 KV connector (``KVConnectorBase_V1``), loaded by configuration alone::

    --kv-transfer-config '{"kv_connector": "KvxferConnector",
                           "kv_connector_module_path": "kvxfer.integrations.vllm",
                           "kv_role": "kv_producer", "kv_connector_extra_config": {...}}'

Layer: engine integration, above the Connector and the registry. ``import kvxfer`` never
imports this package; importing this package imports vLLM only when the connector class is
asked for, so that its vLLM-free parts (:mod:`.config`, :mod:`.metadata`) load anywhere.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvxferConnector"]


def __getattr__(name: str) -> Any:
    # vLLM's KVConnectorFactory does getattr(module, kv_connector): resolve the class lazily
    if name == "KvxferConnector":
        from .connector import KvxferConnector

        return KvxferConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
