"""Resource models (pydantic), their validation, and the manifests they are read from."""

from controller.resources.kinds import KINDS, Checker, Cluster, Module, ReplicatedDir, VirtualIP
from controller.resources.meta import API_VERSION, Condition, ObjectMeta, Resource, Status

__all__ = [
    "API_VERSION",
    "KINDS",
    "Checker",
    "Cluster",
    "Condition",
    "Module",
    "ObjectMeta",
    "ReplicatedDir",
    "Resource",
    "Status",
    "VirtualIP",
]
