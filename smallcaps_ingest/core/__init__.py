"""The data flow with no Dagster import: events -> manifest -> plan -> fetch -> shape -> store -> check."""
