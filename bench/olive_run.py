"""Run Microsoft Olive on one ONNX model (inside bench/.olive-venv; bench/peers.py calls it).

    bench/.olive-venv/bin/python bench/olive_run.py JOB.json

JOB: ``onnx`` (the fp32 model), ``npz`` (data, see olive_user_script.py), ``out`` (a folder),
``max_drop`` (accuracy points Olive may lose, as a fraction), ``threads``, ``samples`` (TPE
search samples), ``batch`` (latency batch size). Olive's passes: ORT static INT8 (QDQ) with its
quantization choices searched, then ORT session-parameter tuning, joint TPE search, accuracy
goal max-degradation. Writes ``out/olive.json``: the best model's path and Olive's metrics.
"""

import json
import sys
import time
from pathlib import Path

from olive.workflows import run as olive_run

HERE = Path(__file__).resolve().parent


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(job["out"])
    data = lambda name, split, batch, limit=None: {  # noqa: E731
        "name": name, "type": "DataContainer", "user_script": str(HERE / "olive_user_script.py"),
        "load_dataset_config": {"type": "slimkit_npz", "source": job["npz"], "split": split, "limit": limit},
        "post_process_data_config": {"type": "slimkit_argmax"},
        "dataloader_config": {"batch_size": batch},
    }
    config = {
        "input_model": {"type": "ONNXModel", "model_path": job["onnx"]},
        "systems": {"local": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": [data("calib", "train", 16, 256), data("val", "val", 64),
                         data("latency", "val", job["batch"], 64 * job["batch"])],
        "evaluators": {"common": {"type": "OnnxEvaluator", "metrics": [
            {"name": "accuracy", "type": "accuracy", "data_config": "val",
             "sub_types": [{"name": "accuracy_score", "priority": 1,
                            "goal": {"type": "max-degradation", "value": job["max_drop"]},
                            "metric_config": {"task": "multiclass", "num_classes": job["classes"]}}]},
            {"name": "latency", "type": "latency", "data_config": "latency",
             "sub_types": [{"name": "avg", "priority": 2}],
             "user_config": {"inference_settings": {"onnx": {"session_options": {
                 "intra_op_num_threads": job["threads"], "inter_op_num_threads": 1}}}}},
        ]}},
        "passes": {
            "quantization": {"type": "OnnxStaticQuantization", "data_config": "calib", "quant_format": "QDQ"},
            "session_params_tuning": {"type": "OrtSessionParamsTuning", "data_config": "latency",
                                      "cpu_cores": job["threads"]},
        },
        "search_strategy": {"execution_order": "joint", "sampler": "tpe", "max_samples": job["samples"],
                            "seed": 0},
        "evaluator": "common", "host": "local", "target": "local",
        "evaluate_input_model": True,
        "output_dir": str(out / "output"), "cache_dir": str(out / "cache"),
        "log_severity_level": int(job.get("log_level", 3)),
    }
    t0 = time.perf_counter()
    output = olive_run(config)
    seconds = time.perf_counter() - t0
    best = output.get_best_candidate() if output is not None else None
    result = {"seconds": round(seconds, 1), "model": None, "metrics": None, "config": None}
    if best is not None:
        result.update(model=str(best.model_path), metrics=json.loads(best.metrics_value.to_json()) if hasattr(best.metrics_value, "to_json") else str(best.metrics_value),
                      config=best.model_config if isinstance(best.model_config, dict) else str(best.model_config))
    (out / "olive.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
