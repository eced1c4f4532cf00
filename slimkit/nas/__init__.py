"""Hardware-aware architecture search (``slimkit latency-table``, ``slimkit nas``).

- architecture families and their search spaces, declared as data (:class:`Space`,
  :class:`Family`, :func:`register_family`; ``mobilenetv2`` and ``resnet`` are built in);
- the latency table: each block configuration measured once on the target, a candidate's
  latency predicted as the sum over its blocks plus a measured fixed cost
  (:func:`build_latency_table`, :class:`LatencyTable`);
- the search (:func:`nas`): candidates over the latency budget by the table are rejected
  before any training, the others trained briefly (distilled from a teacher), measured for
  real and judged on the ``compress`` search's machinery (storage, resume, workers, results);
- a weight-sharing supernet (Once-for-All style, :class:`Supernet`, :func:`train_supernet`,
  :func:`evaluate_subnet`): one network trained once, any architecture evaluated by inheriting
  its weights.

>>> from slimkit.nas import nas, build_latency_table  # doctest: +SKIP
>>> table = build_latency_table("mobilenetv2", "digits", target="ort-cpu", batch=1)  # doctest: +SKIP
>>> res = nas("mobilenetv2", "digits", latency_table=table, max_latency_ms=0.3, trials=10)  # doctest: +SKIP
"""

from ._search import NasResult, nas
from ._space import Family, Space, arch_summary, family_names, get_family, load_space, register_family
from ._supernet import Supernet, evaluate_subnet, train_supernet
from ._table import LatencyTable, block_plan, build_latency_table, interleaved_medians

__all__ = ["nas", "NasResult", "Family", "Space", "register_family", "get_family", "family_names", "load_space",
           "arch_summary", "LatencyTable", "build_latency_table", "block_plan", "interleaved_medians", "Supernet",
           "train_supernet", "evaluate_subnet"]
