"""``explain(model_t)``: what the pass found, one row per σ' node."""

from __future__ import annotations

from dataclasses import dataclass

from .owners import owner_of


@dataclass
class Report:
    rows: list[dict]
    r_bytes: int
    adam_bytes: int
    params_plain: dict[str, str]     # parameters on the plain gradient everywhere -> why

    def __str__(self) -> str:
        if not self.rows:
            return "svgd_fx: no σ' node captured yet (run one forward/backward first)"
        tso = any(row.get("state_shapes") for row in self.rows)
        head = ["node", "op", "source", "params (linear?)", "T", "factors" if tso else "r_shape",
                "state_bytes" if tso else "r_bytes"]
        body = []
        for row in self.rows:
            params = ", ".join(f"{p}:{'yes' if ok else 'no'}" for p, ok in row["linear"].items())
            if tso:
                shapes = row.get("state_shapes") or {}
                shape = " ".join(f"{k}:{'x'.join(map(str, shapes[k]))}" for k in ("A", "B") if k in shapes) or "-"
            else:
                shape = "x".join(map(str, row["r_shape"])) if row["r_shape"] is not None else "-"
                if row.get("r_averaged"):
                    shape += f" (mean over dim {','.join(map(str, row['r_averaged']))})"
            body.append([row["node"], row["op"], row["source"], params, "T" if row["t_in_graph"] else "-",
                         shape, str(row["r_bytes"])])
        widths = [min(48, max(len(h), *(len(r[i]) for r in body))) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c[:w].ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
        what = "TSO-ALRA state (factors, roots, steps)" if tso else "r"
        lines.append(f"{what} total: {self.r_bytes:,} bytes  vs Adam's exp_avg+exp_avg_sq: {self.adam_bytes:,} bytes"
                     f" ({self.r_bytes / max(self.adam_bytes, 1):.1%})")
        for row in self.rows:
            for p, why in row["reasons"].items():
                if not row["linear"][p]:
                    lines.append(f"  plain gradient for {p} at {row['node']}: {why}")
        for p, why in self.params_plain.items():
            lines.append(f"  plain gradient for {p}: {why}")
        return "\n".join(lines)

    __repr__ = __str__


def explain(model_t) -> Report:
    """What the pass found: for ``transform``'s result, or a model compiled with ``backend="svgd"``."""
    model_t = owner_of(model_t, "explain", create=False)
    rows = []
    r_bytes = 0
    touched = set()
    for name, rec in model_t.log.records.items():
        sigma = rec.sigma
        linear = {p: inp.linear for inp in sigma.param_inputs for p in inp.params}
        reasons = {p: inp.reason for inp in sigma.param_inputs for p in inp.params}
        tensors = model_t.svgd_state.tensors
        r = tensors.get(rec.key) if rec.key else None
        nbytes = r.numel() * r.element_size() if r is not None else 0
        state_shapes = {}
        for key in rec.state_keys:     # TSO-ALRA: factors, roots, step counter
            if key in tensors:
                nbytes += tensors[key].numel() * tensors[key].element_size()
                state_shapes[key.rsplit(".", 1)[1]] = tuple(tensors[key].shape)
        r_bytes += nbytes
        touched.update(p for p, ok in linear.items() if ok and rec.t_graphs)
        rows.append({
            "node": name, "op": sigma.op, "source": sigma.location,
            "params": list(linear), "linear": linear, "reasons": reasons,
            "t_in_graph": rec.t_graphs > 0, "r_key": rec.key,
            "r_shape": tuple(r.shape) if r is not None else rec.r_shape, "r_bytes": nbytes,
            "r_averaged": model_t.svgd_state.layouts.get(rec.key, ()) if rec.key else (),
            "state_shapes": state_shapes,
        })
    trainable = {n: p for n, p in model_t.model.named_parameters() if p.requires_grad}
    adam = sum(2 * p.numel() * p.element_size() for p in trainable.values())
    in_rows = {p for row in rows for p in row["params"]}
    plain = {}
    for n in trainable:
        if n in touched or (n in in_rows and n not in model_t.excluded):
            continue
        if n in model_t.excluded:
            plain[n] = "excluded by the user"
        elif n not in model_t.log.params_seen:
            plain[n] = "not seen by the pass yet"
        else:
            plain[n] = "used only where it enters non-linearly (or not at a σ' node)"
    return Report(rows=rows, r_bytes=r_bytes, adam_bytes=adam, params_plain=plain)
