"""Figures: one ``save_fig`` per notebook, a guard for figure cells, and shared plots.

Used by notebooks 01-05.
"""

import contextlib
import os
import sys

import numpy as np

from ..core.atomic import atomic_path
from ..core.errors import DiskFullError
from ..core.paths import figures_dir


def figure_saver(notebook, run_name):
    """Return ``save_fig(fig, name)`` writing ``runs/<run>/figures/<notebook>_<name>.png``.

    Args:
        notebook: the notebook's number, e.g. ``"01"``: a figure's file name says who made it.
        run_name: the run; figures never land in the repository (``make refresh-committed``
            copies a demo run's into ``figures/``).
    """
    folder = figures_dir(run_name)

    def save_fig(fig, name, dpi=110):
        path = folder / f"{notebook}_{name}.png"
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
        return path

    return save_fig


#: Environment variable that decides whether :func:`figure_guard` re-raises: ``1`` always
#: (the Makefile's nbval line, ``.ci/run``, ``python -m helpers.run --strict-figures``), ``0``
#: never; unset, it re-raises under CI (``CI``) and pytest (``PYTEST_CURRENT_TEST``, which the
#: kernels that nbval and papermill start inherit).
STRICT_FIGURES_ENV = "PAIP_REPRO_STRICT_FIGURES"
_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def strict_figures(environ=None):
    """Whether a failing figure cell must fail (tests, CI) rather than print one line (users' data).

    Args:
        environ: the environment to read (default: ``os.environ``).

    Returns:
        ``True`` when ``PAIP_REPRO_STRICT_FIGURES`` is on, or when it is unset and ``CI`` is
        set (to anything but ``0``/``false``) or pytest is running (``PYTEST_CURRENT_TEST``).

    Raises:
        ValueError: ``PAIP_REPRO_STRICT_FIGURES`` holds something other than 1/0/true/false.
    """
    env = os.environ if environ is None else environ
    value = env.get(STRICT_FIGURES_ENV)
    if value is not None:
        v = value.strip().lower()
        if v not in _ON + _OFF:
            raise ValueError(f"{STRICT_FIGURES_ENV}={value!r}: use 1 (figure errors fail the cell) or 0 (one line)")
        return v in _ON
    ci = env.get("CI", "").strip().lower()
    return ci not in _OFF or bool(env.get("PYTEST_CURRENT_TEST"))


@contextlib.contextmanager
def figure_guard(name, strict=None):
    """Let a figure cell fail without failing the run on a user's own data: an illustration is
    never worth a crash there (an odd slide, a dataset with no example to show). The error is
    printed in one line; a full disk or an interruption still stops the run.

    Under tests and CI (see :func:`strict_figures`) the error is re-raised after its line, so
    a figure that a change broke fails nbval and the CI lane instead of leaving them green.

    Args:
        name: the figure's name, for the message.
        strict: ``True`` re-raises, ``False`` prints the line only; ``None`` (the default)
            asks :func:`strict_figures`.

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
        if strict_figures() if strict is None else strict:
            print(
                f"figure '{name}' failed: not skipped under tests and CI ({STRICT_FIGURES_ENV}=0 skips it)",
                file=sys.stderr,
            )
            raise
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


def heatmap_panels(run, pred, case_ids, size=192):
    """Notebook 05's heatmaps: per slide (a row), each classifier's tumour probability per
    patch (a column per model and scale; patches do not overlap, so each cell is one patch's
    probability), and the ground truth; one shared colour bar.

    Args:
        run: the :class:`helpers.notebook.session.Run`.
        pred: the prediction table (``model``, ``scale``, ``x``, ``y``, ``footprint``, ``prob``).
        case_ids: the slides (one row each).
        size: the longer side of each panel's thumbnail.

    Returns:
        The figure.
    """
    import matplotlib.pyplot as plt

    from ..paper.segmentation_data import mask_fraction_map
    from ..wsi.slides import Slide

    keys = sorted({(m, int(s)) for m, s in zip(pred.model, pred.scale)})
    ncol = len(keys) + 1
    fig, axes = plt.subplots(len(case_ids), ncol, figsize=(1.75 * ncol + 0.6, 1.9 * len(case_ids)), squeeze=False)
    image = None
    for i, cid in enumerate(case_ids):
        case = run.cases[cid]
        with Slide(case.slide, verify=False) as s:
            thumb, d = s.thumbnail(size)
            W, H = s.dimensions
        gray = thumb.mean(2)
        for j, (model, sc) in enumerate(keys):
            ax = axes[i, j]
            heat = np.full(gray.shape, np.nan, np.float32)
            sub = pred[(pred.case_id == cid) & (pred.model == model) & (pred.scale == sc)]
            for r in sub.itertuples():
                y0, x0 = int(r.y / d), int(r.x / d)
                y1, x1 = int((r.y + r.footprint) / d), int((r.x + r.footprint) / d)
                heat[y0:y1, x0:x1] = r.prob
            ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
            image = ax.imshow(heat, cmap="coolwarm", vmin=0, vmax=1, alpha=0.85, interpolation="nearest")
            if i == 0:
                ax.set_title(f"{'EffNet-B0' if model.startswith('eff') else 'ResNet-50'} {sc}x", fontsize=8)
        ax = axes[i, -1]
        mp = case.mask_path(run.params.label_mask)
        ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
        if mp is not None:
            truth = mask_fraction_map(mp, (W, H), max(1, int(d)))[: gray.shape[0], : gray.shape[1]]
            ax.imshow(np.where(truth > 0.5, 1.0, np.nan), cmap="coolwarm", vmin=0, vmax=1, alpha=0.85)
        if i == 0:
            ax.set_title("ground truth" if mp is not None else "no mask", fontsize=8)
        axes[i, 0].set_ylabel(cid, fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    if image is not None:
        cax = fig.add_axes((0.94, 0.15, 0.012, 0.7))
        fig.colorbar(image, cax=cax, label="tumour probability (truth: red)")
    return fig


def augmentation_curves(curves, title):
    """Notebook 04's section 6: validation balanced accuracy per epoch with and without
    augmentation (``curves``: ``{"on": history, "off": history}``).

    Returns:
        The figure.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for name, h in curves.items():
        ax.plot(h.epoch, h.val_bal_acc, "o-", ms=3, label=f"augmentation {name}")
    ax.axhline(0.5, color="0.5", lw=0.8, ls=":", label="chance (one class)")
    ax.set(xlabel="epoch", ylabel="validation balanced accuracy", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure4_panels(run, canvases, out_downsample, limit=4):
    """Notebook 03's Figure 4: slide, ground truth and prediction (green agreed, red predicted
    only, blue missed) for up to ``limit`` slides, those with tumour first, then a tumour-free one.

    Returns:
        The figure.
    """
    import matplotlib.pyplot as plt

    from ..wsi.slides import Slide

    with_t = [c for c, cv in canvases.items() if cv["truth"] is not None and cv["truth"].any()]
    without = [c for c, cv in canvases.items() if cv["truth"] is not None and not cv["truth"].any()]
    rest = [c for c in canvases if c not in with_t and c not in without]
    show = (with_t[: max(1, limit - 1)] + without[:1] + rest)[:limit] or list(canvases)[:limit]
    fig, axes = plt.subplots(len(show), 3, figsize=(8.5, 2.9 * len(show)), squeeze=False)
    for k, cid in enumerate(show):
        cv = canvases[cid]
        h, w = cv["pred"].shape
        with Slide(run.cases[cid].slide, verify=False) as s:
            axes[k, 0].imshow(s.read_region(0, 0, w, h, downsample=cv.get("downsample", out_downsample)))
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


#: Overlay colours of the two PAIP masks (RGB): far from H&E pink and from pen-mark inks.
MASK_COLOURS = {"whole": (235, 200, 0), "viable": (220, 20, 60)}


def thumbnail_grid(cases, size=256, limit=15, ncol=5):
    """Notebook 01's thumbnails: an evenly spaced sample of at most ``limit`` slides, each with
    its whole (yellow) and viable (red) tumour masks read at the thumbnail's scale, with a
    legend (colours chosen apart from the blue, green and black of pen marks on slides).

    Returns:
        ``(figure, number of slides shown)``.
    """
    import matplotlib.pyplot as plt

    from ..wsi.slides import Mask, Slide

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
        ax.imshow(overlay_masks(th, masks, [MASK_COLOURS["whole"], MASK_COLOURS["viable"]], thickness=2))
        ax.set_title(f"{c.case_id} (label {'?' if c.label is None else c.label})", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"{len(shown)} of {len(cases)} slides with their tumour masks", y=1.0)
    handles = [
        plt.Rectangle((0, 0), 1, 1, fc=np.array(MASK_COLOURS[k]) / 255, ec="none", label=f"{k} tumour (_{k} mask)")
        for k in ("whole", "viable")
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.03))
    fig.tight_layout()
    return fig, len(shown)
