"""Communication: bytes a site uploads per round vs the size of the encoder it trains.

The reply is built exactly as the ClientApp builds it (``fedssl.fl.site_reply`` from a real
``train_round`` result, then ``Message(reply_to=...)``), and measured as what Flower 1.42
moves: the message is split into content-addressed objects (Message, RecordDict,
ArrayRecord, Array, ArrayChunk, MetricRecord), each pushed as its serialized bytes. The
sum of those bytes is the upload; protobuf/gRPC framing adds a few bytes per object on top.
The server's instruction (encoder + train config) is the download.

Target: upload <= 1.05 x the encoder's float32 parameter bytes. SecAgg+ upload cost is
measured here for the stage that carries the weights (the masked vector); its time cost is
measured by benchmarks/secagg_cost.py.

    python benchmarks/communication.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_SITE_POLICY, machine_info, quiet_warnings, write_result  # noqa: E402

import torch  # noqa: E402

SERVER_NODE, SITE_NODE = 0, 4242
TARGET = 1.05


def _message_bytes(message) -> tuple[int, int]:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = get_all_nested_objects(message)
    return sum(len(obj.deflate()) for obj in objects.values()), len(objects)


def _instruction(arrays: dict[str, torch.Tensor], plan):
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.app import Metadata

    from fedssl.fl import keys

    metadata = Metadata(
        run_id=7, message_id=uuid.uuid4().hex, src_node_id=SERVER_NODE, dst_node_id=SITE_NODE, reply_to_message_id="",
        group_id=str(plan.server_round), created_at=time.time(), ttl=3600.0, message_type="train",
    )
    return Message(content=RecordDict({keys.ARRAYS: ArrayRecord(arrays), keys.CONFIG: ConfigRecord(plan.to_wire())}), metadata=metadata)


def measure(encoder: str, input_shape: tuple[int, ...], width: int, depth: int, dp: bool, state_root: Path) -> dict:
    from flwr.app import Message, RecordDict

    from fedssl.data.dataset import SiteDataset
    from fedssl.fl.site_reply import site_reply_records
    from fedssl.models import build_encoder
    from fedssl.config import PrivacyConfig
    from fedssl.training.local import SiteSettings, train_round
    from fedssl.fl.plan import TrainPlan

    enc = build_encoder(encoder, input_shape, width=width, depth=depth, seed=0)
    state = enc.state_dict()
    param_bytes = sum(t.numel() * t.element_size() for t in state.values())
    pretext = "rotation" if len(input_shape) == 3 else "masked_reconstruction"
    plan = TrainPlan(run_id="comm", server_round=1, planned_rounds=1, pretext=pretext, encoder=encoder, width=width,
                     depth=depth, local_steps=1, batch_size=16, lr=0.05)
    data = SiteDataset(torch.rand(64, *input_shape), tuple(f"s{i}" for i in range(64)), "image" if len(input_shape) == 3 else "vector")
    site = SiteSettings(site_id=0, state_dir=state_root / f"{encoder}-{width}-{depth}-{int(dp)}", privacy=PrivacyConfig(enabled=dp, **BENCH_SITE_POLICY))
    result = train_round(data, state, plan, site)
    instruction = _instruction(state, plan)
    reply = Message(content=RecordDict(site_reply_records(result, 0, dp, plan)), reply_to=instruction)
    up, up_objects = _message_bytes(reply)
    down, down_objects = _message_bytes(instruction)
    # For reference only: the same reply with the encoder packed into one flat array (one
    # Array + chunk instead of one per tensor); fedssl does not send this today.
    from flwr.app import ArrayRecord

    from fedssl.fl import keys

    packed = site_reply_records(result, 0, dp, plan)
    packed[keys.ARRAYS] = ArrayRecord({"flat": torch.cat([t.flatten() for t in result.encoder_state.values()])})
    packed_up, _ = _message_bytes(Message(content=RecordDict(packed), reply_to=instruction))
    return {
        "encoder": encoder, "width": width, "depth": depth, "dp": dp,
        "num_params": sum(t.numel() for t in state.values()),
        "param_bytes": param_bytes,
        "upload_bytes": up, "upload_objects": up_objects, "upload_ratio": up / param_bytes,
        "packed_upload_bytes": packed_up, "packed_upload_ratio": packed_up / param_bytes,
        "download_bytes": down, "download_objects": down_objects, "download_ratio": down / param_bytes,
    }


def secagg_masked_upload(state: dict[str, torch.Tensor], num_examples: int = 126) -> dict:
    """Bytes of the SecAgg+ stage-2 reply (the masked, quantized vector), built with Flower's own
    functions exactly as ``secaggplus_mod._collect_masked_vectors`` does, with fedssl's defaults
    (clipping 8, 2**22 levels, modulus 2**32, max weight 1000); the other stages carry keys and
    shares of a few hundred bytes per neighbour. Masks are drawn as int64, so each weight travels as 8 bytes.
    """
    import numpy as np
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine, parameters_addition, parameters_mod, parameters_multiply)
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    clipping, levels, modulus, max_weight = 8.0, 2**22, 2**32, 1000.0
    arrays = [t.detach().cpu().numpy() for t in state.values()]
    q_ratio = round(num_examples / max_weight * levels)
    quantized = factor_combine(q_ratio, quantize(parameters_multiply(arrays, q_ratio / levels), clipping, levels))
    masked = parameters_mod(parameters_addition(quantized, pseudo_rand_gen(b"\x01" * 32, modulus, [a.shape for a in quantized])), modulus)
    record = ConfigRecord({"masked_parameters": [ndarray_to_bytes(np.asarray(a)) for a in masked]})
    plan = type("P", (), {"server_round": 1, "to_wire": lambda self: {}})()
    reply = Message(content=RecordDict({"fitres.parameters": record}), reply_to=_instruction(state, plan))
    up, _ = _message_bytes(reply)
    param_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return {"masked_dtype": str(np.asarray(masked[1]).dtype), "upload_bytes": up, "upload_ratio": up / param_bytes, "param_bytes": param_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sites", type=int, default=10, help="sites per round, for the per-round totals")
    args = parser.parse_args(argv)
    quiet_warnings()
    torch.set_num_threads(1)
    configs = [("cnn", (1, 8, 8), 8, 2), ("cnn", (1, 8, 8), 64, 3)] if args.quick else [
        ("cnn", (1, 8, 8), 8, 2),
        ("cnn", (1, 8, 8), 16, 3),
        ("cnn", (1, 8, 8), 32, 3),
        ("cnn", (1, 8, 8), 64, 3),
        ("cnn", (1, 8, 8), 128, 3),
        ("mlp", (64,), 128, 2),
        ("mlp", (64,), 512, 3),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for encoder, shape, width, depth in configs:
            for dp in (True, False):
                row = measure(encoder, shape, width, depth, dp, Path(tmp))
                rows.append(row)
                print(
                    f"communication: {encoder} w{width} d{depth} {'DP ' if dp else 'noDP'} params {row['param_bytes']:>9,d} B  "
                    f"upload {row['upload_bytes']:>9,d} B ({row['upload_ratio']:.4f}x, packed {row['packed_upload_ratio']:.4f}x)  download {row['download_bytes']:>9,d} B",
                    flush=True,
                )
    demo = next(r for r in rows if r["encoder"] == "cnn" and r["width"] == 64 and r["dp"])
    from fedssl.models import build_encoder

    secagg = secagg_masked_upload(build_encoder("cnn", (1, 8, 8), width=64, depth=3, seed=0).state_dict())
    print(f"communication: SecAgg+ masked vector for the demo encoder: {secagg['upload_bytes']:,} B "
          f"({secagg['upload_ratio']:.3f}x, {secagg['masked_dtype']})", flush=True)
    payload = {
        "machine": machine_info(),
        "target_upload_ratio": TARGET,
        "rows": rows,
        "demo_encoder": {**demo, "per_round_upload_bytes_all_sites": demo["upload_bytes"] * args.sites, "sites": args.sites},
        "worst_upload_ratio": max(r["upload_ratio"] for r in rows),
        "secagg_plus_demo_encoder": secagg,
        "secagg_time": "measured by benchmarks/secagg_cost.py (results/secagg_cost.json)",
    }
    path = write_result("communication", payload, args.quick)
    print(f"communication: worst upload ratio {payload['worst_upload_ratio']:.4f}x (target <= {TARGET}); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
