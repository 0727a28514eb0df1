"""``dermbatch build-engine``: parse and check the options, then call ``engines.build`` (imported lazily)."""

from __future__ import annotations

from pathlib import Path

import typer

from dermbatch.cli.app import app, setup_logging
from dermbatch.errors import UsageError


@app.command("build-engine")
def build_engine_command(
    model: Path | None = typer.Option(None, "--model", "-m", help="Bundle [default: installed bundle]."),
    target: str = typer.Option("auto", help="auto | onnxruntime | openvino | tensorrt (auto: what `run --backend "
                                            "auto` would use here: TensorRT FP16 with TensorRT and a GPU, else "
                                            "OpenVINO fp32 when installed, else ONNX Runtime fp32)."),
    precision: str | None = typer.Option(None, help="fp32 | fp16 (TensorRT) | int8 (ONNX Runtime) | bf16 "
                                                    "(OpenVINO) [default: fp16 for TensorRT, else fp32]."),
    batch: str = typer.Option("1,8,32", help="TensorRT optimisation profile: MIN,OPT,MAX batch."),
    calibration: Path | None = typer.Option(None, help="Real images to calibrate INT8 and check engines on."),
    min_agreement: float = typer.Option(0.95, help="int8/bf16/TensorRT engines are kept only if their top-1 / mask IoU "
                                                        "vs fp32 reach this."),
    device: str = typer.Option("auto", help="GPU for TensorRT builds: auto | cuda | cuda:N."),
) -> int:
    """Compile the bundle's models into engines stored beside it (several targets and precisions coexist)."""
    from engines.build import build_engine

    setup_logging()
    try:
        low, opt, high = (int(v) for v in batch.split(","))
    except ValueError:
        raise UsageError(f"--batch {batch!r}: give MIN,OPT,MAX, e.g. 1,8,32") from None
    folder = build_engine(str(model) if model else None, target, precision, (low, opt, high), calibration,
                          min_agreement, device)
    typer.echo(str(folder))
    return 0
