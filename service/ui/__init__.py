"""The live page's static files (``static/``: HTML, CSS, JavaScript and the vendored Swagger UI),
served by service/api/routes/ui.py. A package so that they ship as package data."""
