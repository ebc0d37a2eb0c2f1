-- Fine-tuned models as served objects: what the model is (task, labels, architecture; written
-- by the worker that exported it) and whether its owner deleted it. A deleted model keeps its
-- job (the job's history still names it) but is no longer listed, served or fine-tuned from.
ALTER TABLE fine_tuning_jobs
    ADD COLUMN model_info jsonb,
    ADD COLUMN model_deleted_at timestamptz,
    ADD CONSTRAINT fine_tuning_jobs_model_deleted CHECK (model_deleted_at IS NULL OR state = 'succeeded');
