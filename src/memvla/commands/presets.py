"""``memvla presets``: the named presets with their parameter counts."""

from __future__ import annotations

HELP = "list the model presets with their parameter counts"


def add_arguments(parser) -> None:
    parser.add_argument("--show", metavar="NAME", help="print one preset's full config as JSON")
    parser.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override applied before counting (repeatable)")


def run(args) -> int:
    import json

    from ..config_utils import to_dict
    from ..presets import PRESETS, count_parameters, get_preset

    if args.show:
        print(json.dumps(to_dict(get_preset(args.show, args.override)), indent=2))
        return 0
    rows = []
    for name in PRESETS:
        cfg = get_preset(name, args.override)
        m = cfg.model
        expert = m.expert.width if cfg.family == "flow" else "-"  # parallel: no expert
        rows.append((name, count_parameters(cfg), m.text.depth, m.text.width, expert,
                     m.vision.image_size, m.tokens_per_image, m.chunk_size))
    head = ("preset", "parameters", "layers", "width", "expert", "image", "tok/img", "chunk")
    print(f"{head[0]:<16}{head[1]:>14}{head[2]:>8}{head[3]:>7}{head[4]:>8}{head[5]:>7}"
          f"{head[6]:>9}{head[7]:>7}")
    for r in rows:
        print(f"{r[0]:<16}{r[1]:>14,}{r[2]:>8}{r[3]:>7}{r[4]!s:>8}{r[5]:>7}{r[6]:>9}{r[7]:>7}")
    return 0
