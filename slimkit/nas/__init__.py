"""Hardware-aware architecture search (``slimkit latency-table``, ``slimkit nas``).

- architecture families and their search spaces, declared as data (:class:`Space`,
  :class:`Family`, :func:`register_family`; ``mobilenetv2`` and ``resnet`` are built in);
- the latency table: each block configuration measured once on the target, a candidate's
  latency predicted as the sum over its blocks plus a measured fixed cost
  (:func:`build_latency_table`, :class:`LatencyTable`);
- the search (:func:`nas`, on :class:`NasSpace`): candidates over the latency budget by the
  table are rejected before any training, the others trained briefly (distilled from a
  teacher), measured for real and judged on the study kit of :mod:`slimkit.search` (storage,
  resume, workers, results);
- a weight-sharing supernet (Once-for-All style, :class:`Supernet`, :func:`train_supernet`,
  :func:`evaluate_subnet`): one network trained once, any architecture evaluated by inheriting
  its weights.

>>> from slimkit.nas import NasSpace, build_latency_table, nas  # doctest: +SKIP
>>> from slimkit.search import Budget, Search  # doctest: +SKIP
>>> table = build_latency_table("mobilenetv2", "digits", "ort-cpu")  # doctest: +SKIP
>>> res = nas(NasSpace("mobilenetv2", latency_table=table), "digits",
...           budget=Budget(max_latency_ms=0.3, max_accuracy_drop=None), search=Search(trials=10))  # doctest: +SKIP
"""

from ._chain import block_plan, onnx_chain
from ._hooks import ParetoStop, RecalibrateBN, recalibrate_bn, weight_kb
from ._objective import NasObjective, proxy_recipe
from ._options import NasSpace
from ._search import NasResult, nas, nas_worker
from ._space import Family, Space, arch_summary, family_names, get_family, load_space, register_family
from ._supernet import Supernet, evaluate_subnet, train_supernet
from ._table import LatencyTable, TableConfig, build_latency_table, relative_error

__all__ = ["nas", "nas_worker", "NasSpace", "NasResult", "NasObjective", "proxy_recipe", "Family", "Space",
           "register_family", "get_family", "family_names", "load_space", "arch_summary", "LatencyTable",
           "TableConfig", "build_latency_table", "relative_error", "block_plan", "onnx_chain", "ParetoStop", "RecalibrateBN",
           "recalibrate_bn", "weight_kb", "Supernet", "train_supernet", "evaluate_subnet"]
