"""One self-contained, offline HTML report per training run, eval sweep or train-and-evaluate run.

    python run.py task=report report.dir=outputs/finetune_eval/<time>     # writes <dir>/report.html
    python run.py task=report report.dir=multirun/eval/<time> report.baseline='lora_scale=[0]'

From Python (e.g. at the end of the default job): ``write_report(run_dir) -> Path``.
``collect`` reads what the dir holds, ``table`` turns result rows into the sortable table,
``figures`` builds the plotly figures, ``render`` fills ``templates/report.html.j2``.
"""

from toolkit.report.collect import Collected, collect, detect
from toolkit.report.render import write_report
from toolkit.report.table import pareto_front, summary_entries, table_columns

__all__ = ["Collected", "collect", "detect", "pareto_front", "summary_entries", "table_columns", "write_report"]
