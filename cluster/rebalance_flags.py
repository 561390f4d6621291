"""`serve` flags for hot-expert replicas, live rebalancing and worker autoscaling, checked before anything starts."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .autoscale import AutoscaleConfig
from .cli_args import non_negative_int, positive_float, positive_int

if TYPE_CHECKING:  # cluster.rebalance imports Ray: only when serving
    from .rebalance import RebalanceConfig

DEFAULT_INTERVAL_S = 30.0  # when --redundant-experts or --autoscale is given without --rebalance-interval


def imbalance_target(text: str) -> float:
    value = positive_float(text)
    if value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a max / mean ratio >= 1.0, got {text!r}")
    return value


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redundant-experts", type=non_negative_int, default=0, metavar="N",
                   help="extra physical expert slots per layer (as vLLM's and DeepSeek EPLB's "
                        "num_redundant_experts): from the start (spread as for uniform load, replacing "
                        "--placement; at most one replica of an expert per worker), then each rebalance gives "
                        "them to the experts with the most load per replica")
    p.add_argument("--target-imbalance", type=imbalance_target, default=1.2, metavar="X",
                   help="rebalance when a layer's worker load max / mean stays above X for two windows (default 1.2)")
    p.add_argument("--rebalance-interval", type=positive_float, metavar="S",
                   help=f"load window and rebalance check period in seconds (default: {DEFAULT_INTERVAL_S:g} with "
                        "--redundant-experts or --autoscale, else no automatic rebalancing; "
                        "POST /v1/admin/rebalance always works)")
    p.add_argument("--autoscale", action="store_true",
                   help="add an expert worker under overload and remove one after an idle window "
                        "(see README: Hot experts)")
    p.add_argument("--min-workers", type=positive_int, metavar="A", help="with --autoscale (default 1)")
    p.add_argument("--max-workers", type=positive_int, metavar="B",
                   help="with --autoscale (default: experts per layer + --redundant-experts)")


@dataclass(frozen=True)
class PlacementSettings:
    rebalance: RebalanceConfig
    autoscale: AutoscaleConfig | None


def settings_from_args(args, num_experts: int) -> PlacementSettings:
    """The validated configs; ValueError (naming the flag) for a combination that cannot work."""
    from .rebalance import RebalanceConfig

    if not args.autoscale and (args.min_workers is not None or args.max_workers is not None):
        raise ValueError("--min-workers / --max-workers: only with --autoscale")
    interval = args.rebalance_interval
    if interval is None and (args.redundant_experts or args.autoscale):
        interval = DEFAULT_INTERVAL_S
    slots = num_experts + args.redundant_experts
    if args.workers > slots:
        raise ValueError(f"--workers {args.workers}: more workers than the {slots} expert slots per layer")
    rebalance = RebalanceConfig(redundant_experts=args.redundant_experts, target_imbalance=args.target_imbalance,
                                interval_s=interval)
    rebalance.validate(num_experts)
    autoscale = None
    if args.autoscale:
        autoscale = AutoscaleConfig(min_workers=args.min_workers or 1, max_workers=args.max_workers or slots)
        autoscale.validate(args.workers, slots)
    return PlacementSettings(rebalance, autoscale)


def attach(controller, cluster, settings: PlacementSettings):
    """A Rebalancer ticking with the serve controller (after its repairs, on a whole expert plane)."""
    from .rebalance import Rebalancer

    rebalancer = Rebalancer(cluster, settings.rebalance, settings.autoscale)
    controller.hooks.append(lambda _controller: rebalancer.tick())
    log = logging.getLogger("cluster.rebalance")
    if not log.handlers:  # serve configures no logging, and its one line per rebalance is INFO
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return rebalancer
