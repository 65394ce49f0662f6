"""Layer 4, reports: accuracy-per-step figures and markdown tables (``figures``), factor
histograms (``plots``).

``filtersurgery.report`` keeps every public name it had as a module."""
from .figures import accuracy_per_step, markdown_table, save_figure
