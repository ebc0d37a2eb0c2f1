-- Scheduling by device memory: what a job needs on the device that trains it, declared in
-- the request (`device_memory_gb`) or estimated from the model and hyperparameters when it
-- was created. A worker claims a job only while the job fits in what its device has free.
ALTER TABLE fine_tuning_jobs
    ADD COLUMN device_memory_bytes bigint
        CHECK (device_memory_bytes IS NULL OR device_memory_bytes > 0),
    ADD COLUMN device_memory_estimated boolean NOT NULL DEFAULT false;
