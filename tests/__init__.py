"""Strata's tests, a package: helpers import as `tests.model_factory`, `tests.server_fixtures`, ...,
one name each (pytest then puts the repository root, not tests/, on sys.path, so a bare
`import model_factory` fails instead of loading a second copy of the module)."""
