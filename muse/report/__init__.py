"""Results files → tables (Jinja2 templates, package data), plots, REPORT.md and report.html."""
