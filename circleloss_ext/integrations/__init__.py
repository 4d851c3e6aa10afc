"""Adapters to other libraries, one module per library, each imported only on demand
(`from circleloss_ext.integrations import insightface`). They are thin layers over the core API."""
