"""The Dagster pipeline, thin glue over the core: resources, assets, checks, jobs and sensors."""
