"""The heads' tests train small models on the CPU: one intra-op thread each, as the tools' tests."""
from ..tools.conftest import one_thread  # noqa: F401  (autouse)
