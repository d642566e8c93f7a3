"""Figures: one ``save_fig`` per notebook, and the plots that several notebooks draw.

Used by notebooks 01-05.
"""

import numpy as np

from .paths import figures_dir


def figure_saver(notebook, run_name):
    """Return ``save_fig(fig, name)`` writing ``<figures>/<notebook>_<name>.png`` at a fixed dpi.

    Args:
        notebook: the notebook's number, e.g. ``"01"``: a figure's file name says who made it.
        run_name: ``demo`` writes to the repository's ``figures/`` (committed); other runs to
            their own run folder, so a run on private slides never lands in the repository.
    """
    folder = figures_dir(run_name)

    def save_fig(fig, name, dpi=110):
        path = folder / f"{notebook}_{name}.png"
        fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
        return path

    return save_fig


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
