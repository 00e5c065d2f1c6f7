"""Reports of a segmentation: volumes and involvement, severity, the overview picture, the HTML page."""

from covidseg.report.severity import SEVERITY_SOURCE, Severity, severity
from covidseg.report.volumes import involvement

__all__ = ["SEVERITY_SOURCE", "Severity", "involvement", "severity"]
