"""memq configuration: one typed settings object read from MEMQ_* once, plus Celery's config."""

from config.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
