"""Layer 4, reports: accuracy-per-step figures and markdown tables (``figures``), factor histograms
(``plots``), what training a network costs, measured (``cost``)."""
from .figures import accuracy_per_step, markdown_table, save_figure
