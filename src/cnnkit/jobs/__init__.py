"""The jobs behind the commands: one module per command, each a plain function from its inputs to
a result (a dict or a dataclass) that writes files but never prints, parses arguments or exits.

    cli  ->  jobs  ->  the library (training, evaluate, explain, report, export, serve, models, data, ...)

The command line (cli/) parses and prints; a job does the work; the library below knows nothing of
either. No job imports another job's module (what two jobs share lives in the library, e.g.
report_folder.py for the files of an evaluation), and no library module imports a job. The
import-linter contracts in pyproject.toml hold all three rules.

A new command: one module here, its parser and printer in cli/, and its tests.
"""
