"""The lab dashboard in the browser: server-rendered pages on the service's own app (`/ui/`)."""

from crosspatch.app.web.pages import router

__all__ = ["router"]
