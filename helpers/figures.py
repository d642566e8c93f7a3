"""Figures: one ``save_fig`` per notebook, a guard for figure cells, and shared plots.

Used by notebooks 01-05.
"""

import contextlib
import sys

import numpy as np

from .errors import DiskFullError
from .paths import figures_dir


def figure_saver(notebook, run_name):
    """Return ``save_fig(fig, name)`` writing ``runs/<run>/figures/<notebook>_<name>.png``.

    Args:
        notebook: the notebook's number, e.g. ``"01"``: a figure's file name says who made it.
        run_name: the run; figures never land in the repository (``make refresh-committed``
            copies a demo run's into ``figures/``).
    """
    folder = figures_dir(run_name)

    def save_fig(fig, name, dpi=110):
        from .atomic import atomic_path

        path = folder / f"{notebook}_{name}.png"
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
        return path

    return save_fig


@contextlib.contextmanager
def figure_guard(name):
    """Let a figure cell fail without failing the run: an illustration is never worth a crash
    (an odd slide, a dataset with no example to show). The error is printed in one line; a full
    disk or an interruption still stops the run.

    Example:
        >>> with figure_guard("thumbnails"):          # doctest: +SKIP
        ...     draw_the_figure()
    """
    try:
        yield
    except (DiskFullError, KeyboardInterrupt):
        raise
    except Exception as exc:
        import matplotlib.pyplot as plt

        plt.close("all")
        print(f"figure '{name}' skipped: {type(exc).__name__}: {exc}", file=sys.stderr)


def mask_outline(mask):
    """Boolean outline (4-neighbour boundary) of a binary mask, for drawing over an image."""
    m = np.asarray(mask).astype(bool)
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def overlay_masks(image, masks, colors, alpha=0.25, thickness=1):
    """Draw filled, translucent masks with solid outlines over an RGB image.

    Args:
        image: ``(h, w, 3)`` uint8.
        masks: list of ``(h, w)`` binary masks.
        colors: one RGB triple (0-255) per mask.
        alpha: fill opacity.
        thickness: outline thickness in pixels.

    Returns:
        A new uint8 image.
    """
    out = image.astype(np.float32).copy()
    for m, c in zip(masks, colors):
        m = np.asarray(m).astype(bool)
        c = np.asarray(c, np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * c
        edge = mask_outline(m)
        for _ in range(thickness - 1):
            e = edge.copy()
            e[1:] |= edge[:-1]
            e[:, 1:] |= edge[:, :-1]
            edge = e
        out[edge] = c
    return out.clip(0, 255).astype(np.uint8)


def patch_grid(ax_row, patches, titles=None):
    """Show patches along a row of axes (axes without a patch are blanked)."""
    for i, ax in enumerate(ax_row):
        ax.axis("off")
        if i < len(patches):
            ax.imshow(patches[i])
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)


def heatmap_panels(run, pred, model, case_ids, regions=None, region_size=0, size=384):
    """Notebook 05's heatmaps: per slide, one panel per scale with each patch's tumour
    probability over the slide, and the ground truth (when the slide has a mask).

    Args:
        run: the :class:`helpers.notebook.Run`.
        pred: the prediction table.
        model: whose predictions to draw.
        case_ids: the slides (one row each).
        regions: region votes indexed by unit (``final`` column) to outline, or ``None``.
        region_size: their side in level-0 px.
        size: the longer side of each panel's thumbnail.

    Returns:
        The figure.
    """
    import matplotlib.pyplot as plt

    from .segmentation import mask_fraction_map
    from .slides import Slide

    scales = sorted(pred.loc[pred.model == model, "scale"].unique())
    fig, axes = plt.subplots(
        len(case_ids), len(scales) + 1, figsize=(2.6 * (len(scales) + 1), 2.6 * len(case_ids)), squeeze=False
    )
    for i, cid in enumerate(case_ids):
        case = run.cases[cid]
        with Slide(case.slide, verify=False) as s:
            thumb, d = s.thumbnail(size)
            W, H = s.dimensions
        for j, sc in enumerate(scales):
            ax = axes[i, j]
            ax.imshow(thumb)
            sub = pred[(pred.case_id == cid) & (pred.model == model) & (pred.scale == sc)]
            for r in sub.itertuples():
                ax.add_patch(
                    plt.Rectangle(
                        (r.x / d, r.y / d),
                        r.footprint / d,
                        r.footprint / d,
                        color=plt.cm.coolwarm(r.prob),
                        alpha=0.45,
                        lw=0,
                    )
                )
            if regions is not None and region_size:
                for u, row in regions[regions.index.str.startswith(cid + ":")].iterrows():
                    rr, cc = u.rsplit(":r", 1)[1].split("c")
                    ax.add_patch(
                        plt.Rectangle(
                            (int(cc) * region_size / d, int(rr) * region_size / d),
                            region_size / d,
                            region_size / d,
                            fill=False,
                            lw=1.0,
                            ec="tab:red" if row["final"] else "0.4",
                        )
                    )
            ax.set_title(f"{cid}: {model} {sc}x ({len(sub)})", fontsize=7)
        ax = axes[i, -1]
        mp = case.mask_path(run.params.label_mask)
        if mp is not None:
            cell = max(1, int(d))
            ax.imshow(mask_fraction_map(mp, (W, H), cell) > 0.5, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title("ground truth" if mp is not None else "no mask", fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    return fig


def figure4_panels(run, canvases, out_downsample, limit=4):
    """Notebook 03's Figure 4: slide, ground truth and prediction (green agreed, red predicted
    only, blue missed) for up to ``limit`` slides, those with tumour first, then a tumour-free one.

    Returns:
        The figure.
    """
    import matplotlib.pyplot as plt

    from .slides import Slide

    with_t = [c for c, cv in canvases.items() if cv["truth"] is not None and cv["truth"].any()]
    without = [c for c, cv in canvases.items() if cv["truth"] is not None and not cv["truth"].any()]
    rest = [c for c in canvases if c not in with_t and c not in without]
    show = (with_t[: max(1, limit - 1)] + without[:1] + rest)[:limit] or list(canvases)[:limit]
    fig, axes = plt.subplots(len(show), 3, figsize=(8.5, 2.9 * len(show)), squeeze=False)
    for k, cid in enumerate(show):
        cv = canvases[cid]
        h, w = cv["pred"].shape
        with Slide(run.cases[cid].slide, verify=False) as s:
            axes[k, 0].imshow(s.read_region(0, 0, w, h, downsample=out_downsample))
        axes[k, 0].set_title(f"{cid}: slide")
        if cv["truth"] is not None:
            axes[k, 1].imshow(cv["truth"], cmap="gray_r", vmin=0, vmax=1)
            axes[k, 1].set_title("ground truth")
            agree = np.full((h, w, 3), 255, np.uint8)
            agree[cv["pred"] & cv["truth"]] = (40, 160, 40)
            agree[cv["pred"] & ~cv["truth"]] = (220, 40, 40)
            agree[~cv["pred"] & cv["truth"]] = (60, 90, 220)
            axes[k, 2].imshow(agree)
        else:
            axes[k, 1].set_title("no mask")
            axes[k, 2].imshow(cv["pred"], cmap="gray_r", vmin=0, vmax=1)
        axes[k, 2].set_title("prediction")
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    return fig


def thumbnail_grid(cases, size=256, limit=15, ncol=5):
    """Notebook 01's thumbnails: an evenly spaced sample of at most ``limit`` slides, each with
    its whole (green) and viable (blue) tumour masks read at the thumbnail's scale.

    Returns:
        ``(figure, number of slides shown)``.
    """
    import matplotlib.pyplot as plt

    from .slides import Mask, Slide

    shown = cases[:: max(1, -(-len(cases) // limit))][:limit]
    ncol = min(ncol, len(shown))
    nrow = -(-len(shown) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.3 * ncol, 2.4 * nrow), squeeze=False)
    for ax, c in zip(axes.ravel(), shown):
        with Slide(c.slide) as s:
            th, ds = s.thumbnail(size)
            masks = []
            for m in (c.whole, c.viable):
                if m is None:
                    masks.append(np.zeros(th.shape[:2], np.uint8))
                    continue
                with Mask(m, s.dimensions) as mk:
                    masks.append(mk.read(0, 0, th.shape[1], th.shape[0], downsample=ds))
        ax.imshow(overlay_masks(th, masks, [(40, 170, 60), (40, 70, 220)]))
        ax.set_title(f"{c.case_id} (label {'?' if c.label is None else c.label})", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"{len(shown)} of {len(cases)} slides, whole (green) and viable (blue) tumour", y=1.0)
    fig.tight_layout()
    return fig, len(shown)
