"""``dermbatch build-engine``: parse and check the options, then call ``engines.build`` (imported lazily)."""

from __future__ import annotations

from pathlib import Path

import typer

from dermbatch.cli.app import Command, app, setup_logging
from dermbatch.errors import UsageError


@app.command("build-engine", cls=Command)
def build_engine_command(
    model: Path | None = typer.Option(None, "--model", "-m", metavar="DIR", help="Bundle [default: installed bundle]."),
    target: str = typer.Option("auto", metavar="TARGET",
        help="auto | onnxruntime | openvino | tensorrt (auto: what `run --backend "
                                            "auto` would use here: TensorRT FP16 with TensorRT and a GPU, else "
                                            "OpenVINO fp32 when installed, else ONNX Runtime fp32)."),
    precision: str | None = typer.Option(None, metavar="PRECISION",
        help="fp32 | fp16 (TensorRT) | int8 (ONNX Runtime) | bf16 "
                                                    "(OpenVINO) [default: fp16 for TensorRT, else fp32]."),
    batch: str = typer.Option("1,8,32", metavar="MIN,OPT,MAX",
        help="TensorRT optimisation profile: MIN,OPT,MAX batch."),
    calibration: Path | None = typer.Option(None, metavar="DIR",
        help="Real images to calibrate INT8 and check engines on."),
    min_agreement: float = typer.Option(0.95, metavar="A",
        help="int8/bf16/TensorRT engines are kept only if their top-1 / mask IoU "
                                                        "vs fp32 reach this."),
    device: str = typer.Option("auto", metavar="DEVICE", help="GPU for TensorRT builds: auto | cuda | cuda:N."),
) -> int:
    """Compile the bundle's models into engines stored beside it (several targets and precisions coexist).

    \b
    Examples:
      dermbatch build-engine                                       # the installed bundle, the engine run's auto uses
      dermbatch build-engine --model my-bundle --target onnxruntime --precision int8 --calibration calib/
      dermbatch build-engine --model my-bundle --target tensorrt --batch 1,16,64 --device cuda:1
    """
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
