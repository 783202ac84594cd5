"""PNG plots of a bench/run result: stall and time to durable per system and
size, and throughput against the machine's limits (matplotlib, Agg)."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
SYSTEMS = ["sync", "ackpt", "dcp-thread", "dcp-process", "dcp-thread-ackpt", "nvrx-dcp", "nvrx-torch",
           "floor"]
COLORS = {"sync": "#7f7f7f", "ackpt": "#d62728", "dcp-thread": "#1f77b4", "dcp-process": "#17becf",
          "dcp-thread-ackpt": "#ff7f0e", "nvrx-dcp": "#9467bd", "nvrx-torch": "#8c564b",
          "floor": "#2ca02c"}
SHORT = {"torch": "torch.save", "safetensors": "safetensors", "dcp1": "DCP 1 rank", "dcp2": "DCP 2 ranks"}


def _bytes(label):
    n, unit = label.split()
    return float(n) * (GiB if unit == "GiB" else MiB)


def _ok(res):
    return [r for r in res["results"] if r["status"] == "ok" and "stall_p50_s" in r]


def _bars(res, key, keymax, title, ylabel, path, limit_key=None):
    sizes = res["config"]["sizes"]
    formats = res["config"]["formats"]
    rows = _ok(res)
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        present = [s for s in SYSTEMS if any(r["system"] == s and r["size"] == size for r in rows)]
        width = 0.8 / max(1, len(present))
        for i, s in enumerate(present):
            xs, ys, err = [], [], []
            for j, f in enumerate(formats):
                r = next((r for r in rows if r["system"] == s and r["size"] == size and r["format"] == f), None)
                if r is None:
                    continue
                xs.append(j + (i - (len(present) - 1) / 2) * width)
                ys.append(r[key])
                err.append(max(0.0, r[keymax] - r[key]))
            ax.bar(xs, ys, width, yerr=[[0] * len(err), err], color=COLORS[s], label=s, capsize=2)
        if limit_key:
            lim = res["limits"].get(size, {}).get(limit_key)
            if lim:
                ax.axhline(lim, color="black", ls=":", lw=1, label="warm memcpy")
        ax.set_xticks(range(len(formats)))
        ax.set_xticklabels([SHORT[f] for f in formats], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(size)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title + "\n(bar: median of measured saves; whisker: max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _throughput(res, path):
    sizes = res["config"]["sizes"]
    rows = _ok(res)
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        lim = res["limits"].get(size, {})
        items = [r for r in rows if r["size"] == size and r["system"] not in ("floor",)]
        labels = ["%s\n%s" % (SHORT[r["format"]], r["system"]) for r in items]
        vals = [r["size_bytes"] / MiB / r["durable_p50_s"] for r in items]
        ax.bar(range(len(items)), vals, color=[COLORS[r["system"]] for r in items])
        for key, style, name in (("fio_direct_mib_s", "--", "fio O_DIRECT"),
                                 ("fio_buffered_mib_s", ":", "fio buffered")):
            if lim.get(key):
                ax.axhline(lim[key], color="black", ls=style, lw=1, label="%s %.0f MiB/s" % (name, lim[key]))
        m = res.get("micro", {})
        if m.get("ackpt_write_rate_mib_s") and lim and abs(m.get("size_mib", 0) * MiB - _bytes(size)) < MiB:
            ax.axhline(m["ackpt_write_rate_mib_s"], color=COLORS["ackpt"], ls="-.", lw=1,
                       label="ackpt raw write() %.0f MiB/s" % m["ackpt_write_rate_mib_s"])
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_ylabel("checkpoint bytes / time to durable, MiB/s")
        ax.set_title(size)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("End-to-end save rate (bytes / time to durable)\nagainst the disk's limits (fio, same directory, same run)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _interference(res, path):
    rows = [r for r in _ok(res) if "interference_pct" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 4.2))
    ax.bar(range(len(rows)), [r["interference_pct"] for r in rows], color=[COLORS[r["system"]] for r in rows])
    ax.axhline(10, color="black", ls="--", lw=1, label="target 10%")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(["%s %s\n%s" % (r["size"], SHORT[r["format"]], r["system"]) for r in rows],
                       fontsize=6, rotation=90)
    ax.set_ylabel("compute-loop slow-down while persisting, %")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _train_loop(res, path):
    tl = res.get("train_loop") or {}
    variants = [(v, t) for v, t in (("same-fd", "saved into an open file, fsync"),
                                    ("reopen", "torch.save(path), reopen, fsync"))
                if (tl.get(v) or {}).get("stalls")]
    if not variants:
        return None
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 4.2), squeeze=False)
    for ax, (v, title) in zip(axes[0], variants):
        for system, stalls in tl[v]["stalls"].items():
            ax.plot(range(len(stalls)), stalls, marker="o", label=system, color=COLORS.get(system))
        ax.set_title("%s state dict: %s" % (tl.get("size"), title), fontsize=9)
        ax.set_xticks(range(max(len(s) for s in tl[v]["stalls"].values())))
        ax.set_xlabel("save (0 = the first)")
        ax.set_ylabel("stall, seconds")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(res, out):
    paths = [
        _bars(res, "stall_p50_s", "stall_max_s", "Stall: time inside the save call", "seconds",
              os.path.join(out, "stall.png"), limit_key="memcpy_s"),
        _bars(res, "durable_p50_s", "durable_max_s", "Time to durable", "seconds",
              os.path.join(out, "durable.png")),
        _throughput(res, os.path.join(out, "throughput.png")),
        _interference(res, os.path.join(out, "interference.png")),
        _train_loop(res, os.path.join(out, "train_loop.png")),
    ]
    return [p for p in paths if p]
